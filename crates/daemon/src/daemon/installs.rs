//! The daemon's installed plugins: install (as jobs), versions, switching versions,
//! uninstall, and checking a plugin folder without installing it.

use crate::control::ApiError;
use std::path::Path;
use std::sync::Arc;

use super::{Book, Daemon};
use crate::manifest::PluginSpec;
use crate::spawn::entrypoint_program;

impl Daemon {
    /// Runs install job `id` to its end (waiting for a free slot first) and records the result.
    pub(super) async fn run_job(
        &self,
        id: u64,
        cancel: Arc<crate::install::Cancel>,
    ) -> crate::jobs::Job {
        if let Some(_slot) = self.jobs.start(id).await {
            let work = self.jobs.get(id).map(|j| j.work);
            let result = match work {
                Some(crate::jobs::Work::Install(p)) => {
                    let done = self.install(&p.source, p.force, p.enable, id, &cancel).await;
                    // An upload is kept for a retry; once installed it is not needed.
                    if done.is_ok() {
                        self.remove_upload(Path::new(&p.source));
                    }
                    done.map_err(Into::into)
                }
                // Updates and uninstalls are operations of the book's task, plan and all.
                Some(crate::jobs::Work::Update { name, version: None, force }) => self
                    .op(move |d, b| {
                        Box::pin(async move {
                            // The plan first, in the job's output: what changes, dependencies too.
                            if let Ok(plan) = d.update_one(b, &name, force, true).await {
                                d.jobs.output(id, plugd_control::plan_lines(&plan));
                            }
                            d.update_one(b, &name, force, false).await
                        })
                    })
                    .await
                    .and_then(|r| r),
                Some(crate::jobs::Work::Update { name, version: Some(v), force }) => self
                    .op(move |d, b| {
                        Box::pin(async move {
                            if let Ok(plan) = d.switch_version(b, &name, &v, force, true).await {
                                d.jobs.output(id, plugd_control::plan_lines(&plan));
                            }
                            d.switch_version(b, &name, &v, force, false).await
                        })
                    })
                    .await
                    .and_then(|r| r),
                Some(crate::jobs::Work::Uninstall { name, version, purge }) => self
                    .op(move |d, b| {
                        Box::pin(
                            async move { d.uninstall(b, &name, version.as_deref(), purge).await },
                        )
                    })
                    .await
                    .and_then(|r| r),
                None => Err(ApiError::not_found(format!("no job {id}"))),
            };
            self.jobs.finish(id, result);
        }
        self.jobs.wait(id).await.unwrap_or_else(|| unreachable_job(id))
    }

    /// Queues an install job and runs it in the background; returns its id.
    pub(super) fn spawn_job(
        &self,
        params: crate::jobs::Work,
        retry_of: Option<u64>,
    ) -> Result<u64, ApiError> {
        let me = self
            .me
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(|| ApiError::conflict("background jobs need the running daemon"))?;
        let (id, cancel) = self.jobs.create(params, retry_of);
        self.forget_jobs(self.jobs.prune());
        tokio::spawn(async move {
            me.run_job(id, cancel).await;
        });
        Ok(id)
    }

    /// Removes what forgotten jobs kept under the uploads folder, unless a kept job (a
    /// retry) still installs from it.
    pub(super) fn forget_jobs(&self, gone: Vec<crate::jobs::Job>) {
        for job in gone {
            if let crate::jobs::Work::Install(p) = &job.work {
                if !self.jobs.uses_source(&p.source) {
                    self.remove_upload(Path::new(&p.source));
                }
            }
        }
    }

    /// Removes an uploaded archive (a wheel: its own folder); a source outside the uploads
    /// folder is left alone.
    fn remove_upload(&self, upload: &Path) {
        let dir = self.uploads_dir();
        if !upload.starts_with(&dir) || upload == dir {
            return;
        }
        let _ = match upload.parent().filter(|d| *d != dir) {
            Some(own) => std::fs::remove_dir_all(own),
            None => std::fs::remove_file(upload),
        };
    }

    /// At start: forgets ended jobs past the limit, and removes uploads no kept job installs
    /// from (left by a plugd that stopped between taking an upload and queueing its job, or
    /// by one before uploads were pruned). Only those untouched for a while: a plugd handing
    /// over to this one may be writing one now.
    pub(super) fn tidy_uploads(&self) {
        self.forget_jobs(self.jobs.prune());
        let kept: Vec<std::path::PathBuf> = self
            .jobs
            .list()
            .into_iter()
            .filter_map(|j| match j.work {
                crate::jobs::Work::Install(p) => Some(p.source.into()),
                _ => None,
            })
            .collect();
        let stale = |e: &std::fs::DirEntry| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(600))
        };
        for e in std::fs::read_dir(self.uploads_dir()).into_iter().flatten().flatten() {
            let path = e.path();
            let used = kept.iter().any(|k| *k == path || k.parent() == Some(path.as_path()));
            if !used && stale(&e) {
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }

    /// Installs a plugin from a folder, a `.tar.gz` or a `git+…` URL, as job `job`.
    pub(super) async fn install(
        &self,
        source: &str,
        force: bool,
        enable: bool,
        job: u64,
        cancel: &Arc<crate::install::Cancel>,
    ) -> Result<serde_json::Value, String> {
        let root = self.installed_root();
        std::fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
        let scratch = root.join(format!(".fetch-{}-{job}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let fetched = if crate::wheel::is_wheel(source) {
            self.fetch_wheel(source, &scratch, Some(job), cancel).await.map(|f| Some(Ok(f)))
        } else {
            self.fetch_source(source, &scratch, Some(job), cancel)
                .await
                .map(|f| f.map(|f| f.map(|f| vec![f])))
        };
        let result = match fetched {
            Err(e) => Err(e),
            Ok(Some(Ok(folders))) => {
                // A wheel may hold several plugins: each is installed, in order.
                let mut done = Vec::new();
                let mut failed = None;
                for f in &folders {
                    match self.install_folder(f, force, enable, job, cancel).await {
                        Ok(serde_json::Value::Array(items)) => done.extend(items),
                        Ok(other) => done.push(other),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(serde_json::Value::Array(done)),
                }
            }
            Ok(Some(Err(e))) => Err(format!("{source}: {e}")),
            Ok(None) => self.install_folder(Path::new(source), force, enable, job, cancel).await,
        };
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    /// Brings the wheel `source` (a file, or an http(s) URL) into `scratch`, checks its
    /// signature as an archive's, and writes a plugin folder per plugin it declares.
    async fn fetch_wheel(
        &self,
        source: &str,
        scratch: &Path,
        job: Option<u64>,
        cancel: &Arc<crate::install::Cancel>,
    ) -> Result<Vec<std::path::PathBuf>, String> {
        let trust = self.book().config.trust.clone();
        std::fs::create_dir_all(scratch)
            .map_err(|e| format!("create {}: {e}", scratch.display()))?;
        let remote = source.starts_with("http://") || source.starts_with("https://");
        let (wheel, signature) = if remote {
            // pip reads the name and version from the file name: keep it (a plain name only).
            let file = source.rsplit('/').next().unwrap_or_default();
            if file.is_empty() || file.starts_with('.') || file.contains(['\\', '?', '#']) {
                return Err(format!("{source}: the URL must end in the wheel's file name"));
            }
            let wheel = scratch.join(file);
            let signature = self.download(source, &wheel, scratch, job, cancel, &trust).await?;
            (wheel, signature)
        } else {
            let wheel = std::path::PathBuf::from(source);
            let signature = crate::signing::signature_beside(&wheel);
            (wheel, signature)
        };
        let signer = trust.check_archive(&wheel, signature.as_deref())?;
        self.note(job, vec![signed_line(source, &signer)]);
        let info = crate::wheel::read(&wheel)?;
        let extra = if remote { None } else { crate::wheel::beside(&wheel)? };
        let names: Vec<&str> = info.plugins.iter().map(|(n, _)| n.as_str()).collect();
        self.note(
            job,
            vec![format!("{} {} declares plugins: {}", info.name, info.version, names.join(", "))],
        );
        crate::wheel::plugin_folders(&wheel, &info, extra.as_ref(), &scratch.join("plugins"))
    }

    /// Downloads `url` to `to` (size-capped, http(s) only), and its detached signature
    /// `url.minisig` when signatures are checked (a missing one is not an error unless
    /// they are required): the signature's text, if there is one.
    async fn download(
        &self,
        url: &str,
        to: &Path,
        scratch: &Path,
        job: Option<u64>,
        cancel: &Arc<crate::install::Cancel>,
        trust: &crate::signing::Trust,
    ) -> Result<Option<String>, String> {
        std::fs::create_dir_all(scratch)
            .map_err(|e| format!("create {}: {e}", scratch.display()))?;
        let mut curl = tokio::process::Command::new("curl");
        curl.args(["--fail", "--silent", "--show-error", "--location", "--proto", "=http,https"])
            .arg("--max-filesize")
            .arg(crate::install::MAX_BYTES.to_string())
            .arg("--output")
            .arg(to)
            .arg(url);
        self.note(job, vec![format!("$ curl {url}")]);
        let what = format!("downloading {url}");
        fetch(curl, &what, "install curl to install from a URL", cancel, scratch).await?;
        if !(trust.has_keys() || trust.require) {
            return Ok(None);
        }
        let sig_file = scratch.join("download.minisig");
        let mut curl = tokio::process::Command::new("curl");
        curl.args(["--fail", "--silent", "--location", "--proto", "=http,https"])
            .args(["--max-filesize", "65536", "--output"])
            .arg(&sig_file)
            .arg(format!("{url}.minisig"));
        let _ = fetch(curl, "downloading the signature", "install curl", cancel, scratch).await;
        Ok(std::fs::read_to_string(&sig_file).ok())
    }

    /// A line of job `job`'s output (none for a dry run, which has no job).
    fn note(&self, job: Option<u64>, lines: Vec<String>) {
        if let Some(job) = job {
            self.jobs.output(job, lines);
        }
    }

    /// Brings a git source, a URL or an archive into `scratch` (its signature checked as
    /// configured): the plugin folder in it (or why there is none); None for a folder
    /// source, which is used where it is.
    async fn fetch_source(
        &self,
        source: &str,
        scratch: &Path,
        job: Option<u64>,
        cancel: &Arc<crate::install::Cancel>,
    ) -> Result<Option<Result<std::path::PathBuf, String>>, String> {
        let trust = self.book().config.trust.clone();
        let folder = if let Some(url) = source.strip_prefix("git+") {
            let (url, reference) = match url.split_once('#') {
                Some((u, r)) => (u, Some(r)),
                None => (url, None),
            };
            // Neither part may pass for an option of git's, and only plain transports are
            // allowed (no `ext::`, which runs a command).
            if url.starts_with('-') || reference.is_some_and(|r| r.starts_with('-') || r.is_empty())
            {
                return Err(format!(
                    "{source}: a git source is git+URL or git+URL#ref, and neither may start with '-'"
                ));
            }
            let mut git = tokio::process::Command::new("git");
            git.env("GIT_ALLOW_PROTOCOL", "https:http:ssh:git:file")
                .env("GIT_TERMINAL_PROMPT", "0")
                .args([
                    "-c",
                    "core.hooksPath=/dev/null",
                    "clone",
                    "--quiet",
                    "--depth",
                    "1",
                    "--no-recurse-submodules",
                ]);
            if let Some(r) = reference {
                git.arg(format!("--branch={r}"));
            }
            git.arg("--").arg(url).arg(scratch);
            let what = format!("git clone {url}");
            self.note(job, vec![format!("$ {what}")]);
            fetch(git, &what, "install git to install from a repository", cancel, scratch).await?;
            // The tree's signature, checked before anything of it runs.
            let sig_file = scratch.join(crate::signing::TREE_SIGNATURE);
            let signature = std::fs::symlink_metadata(&sig_file)
                .ok()
                .filter(|m| m.is_file() && m.len() <= 64 << 10)
                .and_then(|_| std::fs::read_to_string(&sig_file).ok());
            if signature.is_some() || trust.require {
                let tree = tree_without_signature(scratch, signature.is_some()).await?;
                let signer = trust.check_tree(source, &tree, signature.as_deref())?;
                self.note(job, vec![signed_line(source, &signer)]);
            }
            let _ = std::fs::remove_dir_all(scratch.join(".git"));
            Some(crate::install::plugin_folder(scratch))
        } else if source.starts_with("http://") || source.starts_with("https://") {
            let zip = source.ends_with(".zip");
            if !(zip || source.ends_with(".tar.gz") || source.ends_with(".tgz")) {
                return Err(format!(
                    "{source}: only .tar.gz and .zip archives can be installed from a URL"
                ));
            }
            let download = scratch.join(if zip { "download.zip" } else { "download.tar.gz" });
            let signature = self.download(source, &download, scratch, job, cancel, &trust).await?;
            let signer = trust.check_archive(&download, signature.as_deref())?;
            self.note(job, vec![signed_line(source, &signer)]);
            let unpacked = scratch.join("unpacked");
            let unpack =
                if zip { crate::install::unpack_zip } else { crate::install::unpack_tar_gz };
            Some(
                unpack(&download, &unpacked).and_then(|_| crate::install::plugin_folder(&unpacked)),
            )
        } else if source.ends_with(".tar.gz")
            || source.ends_with(".tgz")
            || source.ends_with(".zip")
        {
            let archive = Path::new(source);
            let signer = trust
                .check_archive(archive, crate::signing::signature_beside(archive).as_deref())?;
            self.note(job, vec![signed_line(source, &signer)]);
            let unpack = if source.ends_with(".zip") {
                crate::install::unpack_zip
            } else {
                crate::install::unpack_tar_gz
            };
            Some(unpack(archive, scratch).and_then(|_| crate::install::plugin_folder(scratch)))
        } else {
            trust.check_unsigned_kind(source, "folder")?;
            None
        };
        Ok(folder)
    }

    /// Installs a plugin folder; starts it if it is new, else keeps the running version.
    pub(super) async fn install_folder(
        &self,
        source: &Path,
        force: bool,
        enable: bool,
        job: u64,
        cancel: &Arc<crate::install::Cancel>,
    ) -> Result<serde_json::Value, String> {
        let source = source.to_path_buf();
        if !source.is_dir() {
            return Err(format!(
                "{} is not a plugin folder (nor a .tar.gz or git+ URL)",
                source.display()
            ));
        }
        let (_, defaults) = self.dirs_and_defaults(&self.book());
        // Everything but the entrypoint is checked on the source: a [build] may produce it.
        let manifest_path =
            supervisor::foreign::manifest_path(&source).map_err(|e| e.to_string())?;
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| format!("cannot read {}: {e}", manifest_path.display()))?;
        let manifest =
            crate::manifest::Manifest::parse_with_defaults(&text, &manifest_path, &defaults)
                .map_err(|e| e.to_string())?;
        let name = manifest.name.clone();
        let version = manifest.version.to_string();
        // Its requirements must be met by what is already here.
        let unmet: Vec<String> = {
            let book = self.book();
            manifest
                .requires
                .iter()
                .filter_map(|req| match book.known.iter().find(|(n, _)| *n == req.name) {
                    None => Some(format!("requires {}, which is not installed", req.name)),
                    Some((_, k)) if !req.version.matches(&k.spec.manifest.version) => {
                        Some(format!(
                            "requires {} {}, but {} is installed",
                            req.name, req.version, k.spec.manifest.version
                        ))
                    }
                    Some(_) => None,
                })
                .collect()
        };
        if !unmet.is_empty() && !force {
            return Err(format!(
                "{name} {version} {}; install those first (or use --force)",
                unmet.join("; ")
            ));
        }
        let root = self.installed_root();
        let elsewhere = self
            .book()
            .known
            .iter()
            .find(|(n, k)| *n == name && !k.spec.manifest_path.starts_with(&root))
            .map(|(_, k)| k.spec.manifest_path.clone());
        if let Some(other) = elsewhere {
            return Err(format!(
                "a plugin named {name} already comes from {}; rename one of them",
                other.display()
            ));
        }
        // Build (if asked), validate, and make a Python plugin's venv from the copy before it
        // is renamed into place: a failure of any step installs nothing.
        let bin_dirs = self.bin_dirs.clone();
        let venv_root = self.sup.state_root().to_path_buf();
        let host = self.sup.host().clone();
        let (r, n, v) = (root.clone(), name.clone(), version.clone());
        let cancel = cancel.clone();
        let (placed, lines) = tokio::task::spawn_blocking(move || {
            let mut lines = Vec::new();
            let placed = crate::install::place(&r, &n, &v, &source, force, |tmp| {
                build_copy(&manifest, tmp, &venv_root, &host, &mut lines, &cancel)?;
                let spec = PluginSpec::from_manifest_with_defaults(tmp, &defaults)
                    .map_err(|e| e.to_string())?;
                entrypoint_program(&spec, &bin_dirs)?;
                if spec.manifest.runtime == crate::manifest::Runtime::Python {
                    let prepared = crate::python::prepare(&spec, &venv_root, &host, Some(&cancel))?;
                    lines.extend(prepared.log);
                }
                if cancel.is_cancelled() {
                    return Err(crate::install::CANCELLED.into());
                }
                Ok(())
            });
            (placed, lines)
        })
        .await
        .map_err(|e| format!("install task failed: {e}"))?;
        self.jobs.output(job, lines);
        placed?;
        plugd_install::fault::point("install.placed");
        // The commit: from here the plugin list changes, as an operation of the book's task
        // (the fetch and build above ran outside it, so a long pip install blocks nothing).
        self.op(move |d, b| {
            Box::pin(async move { d.commit_install(b, &root, &name, &version, enable).await })
        })
        .await
        .map_err(|e| e.message)
        .and_then(|r| r)
    }

    /// Makes a placed version current if the plugin had none, and starts it.
    async fn commit_install(
        &self,
        book: &mut Book,
        root: &Path,
        name: &str,
        version: &str,
        enable: bool,
    ) -> Result<serde_json::Value, String> {
        let (_, current) = crate::install::versions(root, name);
        if enable && book.disabled.remove(name) {
            self.persist_disabled(book)?;
        }
        match current {
            None => {
                crate::install::set_current(root, name, version)?;
                self.reload_in(book).await;
                // Installed is not done: a plugin that then fails to start fails the job,
                // saying so (the files stay, for its logs and a fix).
                if let Some(why) = book.start_errors.get(name).cloned() {
                    return Err(format!(
                        "installed {name} {version}, but it failed to start: {why}; `plugctl logs {name}` has its output: fix it and `plugctl start {name}`, or `plugctl uninstall {name}`"
                    ));
                }
                self.status_in(book, Some(name)).map_err(|e| e.message)
            }
            Some(running) => Ok(serde_json::json!(format!(
                "installed {name} {version} beside {running}; `plugctl update {name} {version}` switches to it"
            ))),
        }
    }

    /// What installing `source` (a folder, an archive, a URL or a git source, fetched into a
    /// scratch folder first and signature-checked as an install would) would do, without
    /// doing it: its plan as an update's (the running version if any, changed sections, the
    /// dependencies pip would install into its venv, broken `requires`).
    pub(super) async fn install_plan(&self, source: &str) -> Result<serde_json::Value, ApiError> {
        let scratch = self.installed_root().join(format!(
            ".plan-{}-{}",
            std::process::id(),
            PLANS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let cancel = Arc::new(crate::install::Cancel::default());
        let plan = if crate::wheel::is_wheel(source) {
            match self.fetch_wheel(source, &scratch, None, &cancel).await {
                Err(e) => Err(ApiError::bad_request(e)),
                Ok(folders) => folders
                    .iter()
                    .map(|f| self.folder_plan(&f.to_string_lossy()))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|plans| match <[_; 1]>::try_from(plans) {
                        Ok([one]) => one,
                        Err(plans) => serde_json::Value::Array(plans),
                    }),
            }
        } else {
            match self.fetch_source(source, &scratch, None, &cancel).await {
                Err(e) => Err(ApiError::bad_request(e)),
                Ok(Some(Err(e))) => Err(ApiError::bad_request(format!("{source}: {e}"))),
                Ok(Some(Ok(folder))) => self.folder_plan(&folder.to_string_lossy()),
                Ok(None) => self.folder_plan(source),
            }
        };
        let _ = std::fs::remove_dir_all(&scratch);
        plan
    }

    /// What installing the plugin folder `source` would change (see `update_plan`).
    fn folder_plan(&self, source: &str) -> Result<serde_json::Value, ApiError> {
        let folder = Path::new(source);
        if !folder.is_dir() {
            return Err(ApiError::bad_request(format!(
                "{source} is not a plugin folder (nor a .tar.gz, .zip or git+ URL)"
            )));
        }
        let (_, defaults) = self.dirs_and_defaults(&self.book());
        let manifest_path =
            supervisor::foreign::manifest_path(folder).map_err(|e| e.to_string())?;
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| format!("cannot read {}: {e}", manifest_path.display()))?;
        let manifest =
            crate::manifest::Manifest::parse_with_defaults(&text, &manifest_path, &defaults)
                .map_err(|e| e.to_string())?;
        let dir = std::fs::canonicalize(folder).map_err(|e| format!("{source}: {e}"))?;
        let spec = PluginSpec { manifest, dir, manifest_path };
        let name = spec.name().to_string();
        Ok(self.update_plan(&self.book(), &name, &spec).0)
    }

    /// Installed versions of `name`.
    pub(super) fn versions(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        let (all, current) = crate::install::versions(&self.installed_root(), name);
        if all.is_empty() {
            return Err(ApiError::not_found(format!(
                "plugin {name} is not installed (plugins from configured folders have no versions)"
            )));
        }
        let list: Vec<serde_json::Value> = all
            .iter()
            .map(|v| serde_json::json!({"version": v.to_string(), "current": current.as_ref() == Some(v)}))
            .collect();
        Ok(serde_json::Value::Array(list))
    }

    /// Switches `current` to `version` and hot-swaps the running plugin to it.
    pub(super) async fn switch_version(
        &self,
        book: &mut Book,
        name: &str,
        version: &str,
        force: bool,
        dry_run: bool,
    ) -> Result<serde_json::Value, ApiError> {
        let root = self.installed_root();
        let (all, current) = crate::install::versions(&root, name);
        let target = semver::Version::parse(version)
            .map_err(|e| ApiError::bad_request(format!("{version:?} is not a version: {e}")))?;
        if !all.contains(&target) {
            let have: Vec<String> = all.iter().map(|v| v.to_string()).collect();
            return Err(ApiError::not_found(format!(
                "{name} {version} is not installed (installed: {})",
                have.join(", ")
            )));
        }
        if dry_run {
            let path = root.join(name).join(version);
            return self.update_from(book, name, &path, force, true).await;
        }
        let (_, plan) = {
            let path = root.join(name).join(version);
            let spec = PluginSpec::from_manifest_with_defaults(path, &book.config.defaults)
                .map_err(|e| e.to_string())?;
            self.update_plan(book, name, &spec)
        };
        if !plan.is_empty() && !force {
            return Err(ApiError::conflict(format!(
                "{}; use --force to update anyway",
                plan.join("; ")
            )));
        }
        crate::install::set_current(&root, name, version)?;
        match self.update_one(book, name, true, false).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if let Some(back) = current {
                    let _ = crate::install::set_current(&root, name, &back.to_string());
                }
                Err(e)
            }
        }
    }

    /// Stops and removes an installed plugin (or one non-current version of it).
    pub(super) async fn uninstall(
        &self,
        book: &mut Book,
        name: &str,
        version: Option<&str>,
        purge: bool,
    ) -> Result<serde_json::Value, ApiError> {
        let root = self.installed_root();
        let (all, current) = crate::install::versions(&root, name);
        if all.is_empty() {
            return Err(ApiError::not_found(format!("plugin {name} is not installed; plugins from configured folders are removed by deleting their folder")));
        }
        if let Some(v) = version {
            if current.as_ref().map(|c| c.to_string()).as_deref() == Some(v) {
                return Err(ApiError::conflict(format!("{name} {v} is the current version; update or roll back first, or uninstall the whole plugin")));
            }
            if !all.iter().any(|x| x.to_string() == v) {
                return Err(ApiError::not_found(format!("{name} {v} is not installed")));
            }
            std::fs::remove_dir_all(root.join(name).join(v)).map_err(|e| e.to_string())?;
            if let Ok(parsed) = semver::Version::parse(v) {
                let _ = std::fs::remove_dir_all(crate::python::venv_dir(
                    self.sup.state_root(),
                    name,
                    &parsed,
                ));
            }
            return self.versions(name);
        }
        if self.sup.get(name).is_some() {
            let _ = self.sup.unload(name).await;
        }
        std::fs::remove_dir_all(root.join(name))
            .map_err(|e| format!("remove {}: {e}", root.join(name).display()))?;
        book.known.retain(|(n, _)| n != name);
        book.start_errors.remove(name);
        // A venv is derived from the installed files: it goes with them.
        let _ = std::fs::remove_dir_all(crate::python::venvs_of(self.sup.state_root(), name));
        if purge {
            let state = self.state_dir.join("plugins").join(name);
            let _ = std::fs::remove_dir_all(&state);
        }
        Ok(serde_json::json!(format!(
            "uninstalled {name}{}",
            if purge { " and its state" } else { "" }
        )))
    }

    /// Checks a plugin folder without running it: its manifest (with the operator's
    /// `[defaults]`) and its entrypoint. A summary, or what is wrong.
    pub fn validate_folder(&self, folder: &Path) -> Result<serde_json::Value, String> {
        let (_, defaults) = self.dirs_and_defaults(&self.book());
        let manifest_path =
            supervisor::foreign::manifest_path(folder).map_err(|e| e.to_string())?;
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| format!("cannot read {}: {e}", manifest_path.display()))?;
        let m = crate::manifest::Manifest::parse_with_defaults(&text, &manifest_path, &defaults)
            .map_err(|e| e.to_string())?;
        let mut notes = Vec::new();
        match PluginSpec::from_manifest_with_defaults(folder, &defaults) {
            Ok(spec) => {
                if let Err(e) = entrypoint_program(&spec, &self.bin_dirs) {
                    if m.build.is_none() {
                        return Err(e);
                    }
                    notes.push(format!(
                        "the entrypoint is not there yet; the [build] command must make it ({e})"
                    ));
                }
            }
            Err(e) if m.build.is_some() => notes.push(format!(
                "the entrypoint is not there yet; the [build] command must make it ({e})"
            )),
            Err(e) => return Err(e.to_string()),
        }
        if m.runtime == crate::manifest::Runtime::Python {
            notes.push("a Python plugin: its venv is built at install or first start".into());
        }
        let book = self.book();
        let known = &book.known;
        for req in &m.requires {
            match known.iter().find(|(n, _)| *n == req.name) {
                None => notes.push(format!("requires {}, which is not installed here", req.name)),
                Some((_, k)) if !req.version.matches(&k.spec.manifest.version) => {
                    notes.push(format!(
                        "requires {} {}, but {} is installed here",
                        req.name, req.version, k.spec.manifest.version
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(serde_json::json!({
            "valid": true,
            "name": m.name,
            "version": m.version.to_string(),
            "kind": m.kind.to_string(),
            "runtime": if m.runtime == crate::manifest::Runtime::Python { "python" } else { "native" },
            "build": m.build.is_some(),
            "requires": m.requires.iter().map(|r| format!("{} {}", r.name, r.version)).collect::<Vec<_>>(),
            "notes": notes,
        }))
    }
}

fn unreachable_job(id: u64) -> crate::jobs::Job {
    crate::jobs::Job {
        id,
        work: crate::jobs::Work::Install(crate::jobs::InstallParams {
            source: String::new(),
            force: false,
            enable: false,
        }),
        state: crate::jobs::JobState::Failed,
        output: Vec::new(),
        result: None,
        error: Some(format!("job {id} vanished")),
        error_kind: Some(plugd_control::ErrorKind::Failed),
        retry_of: None,
        created_ms: 0,
        finished_ms: None,
    }
}

/// Runs a fetching command (git, curl) in its own process group, at most 5 minutes; a
/// cancel kills the group (git forks helpers) within 50 ms. On any failure `scratch` is
/// removed and the error says `what` failed and why (`missing` is the fix if the tool is
/// not installed).
async fn fetch(
    mut cmd: tokio::process::Command,
    what: &str,
    missing: &str,
    cancel: &crate::install::Cancel,
    scratch: &Path,
) -> Result<(), String> {
    cmd.process_group(0)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let result = async {
        let child = cmd.spawn().map_err(|e| format!("cannot run {what}: {e}; {missing}"))?;
        let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
        let killpg = || {
            if let Some(p) = pgid {
                let _ = nix::sys::signal::killpg(p, nix::sys::signal::Signal::SIGKILL);
            }
        };
        let cancelled = cancel.cancelled();
        let limit = std::time::Duration::from_secs(300);
        let out = tokio::select! {
            out = tokio::time::timeout(limit, child.wait_with_output()) => match out {
                Ok(r) => r.map_err(|e| format!("{what}: {e}"))?,
                Err(_) => {
                    killpg();
                    return Err(format!("{what} took longer than 5 minutes"));
                }
            },
            _ = cancelled => {
                killpg();
                return Err(crate::install::CANCELLED.to_string());
            }
        };
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(scratch);
    }
    result
}

/// Runs the `[build]` command (if any) on the installed copy `tmp`, in the plugin's build
/// jail, then hands the copy back to root (readable by the plugin's group).
fn build_copy(
    manifest: &crate::manifest::Manifest,
    tmp: &Path,
    state_root: &Path,
    host: &crate::sandbox::HostFacts,
    lines: &mut Vec<String>,
    cancel: &crate::install::Cancel,
) -> Result<(), String> {
    let dir = std::fs::canonicalize(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let spec =
        PluginSpec { manifest: manifest.clone(), manifest_path: dir.join("plugin.toml"), dir };
    let steps = crate::install::Steps::new(
        &crate::sandbox::JobSpec {
            spec: &spec,
            state_root,
            read: Vec::new(),
            workspace: &spec.dir,
            network: manifest.build.as_ref().is_some_and(|b| b.network),
        },
        host,
        "build.network",
    )?;
    if let Some(build) = &manifest.build {
        lines.push(steps.describe());
        let args: Vec<&std::ffi::OsStr> =
            build.command[1..].iter().map(std::ffi::OsStr::new).collect();
        let what = format!("the build command {:?}", build.command);
        steps.run(Path::new(&build.command[0]), &args, &spec.dir, &what, lines, Some(cancel))?;
    }
    steps.seal(|_, _| false)
}

/// The job-output line that says whether (and by whom) a source was signed.
fn signed_line(source: &str, signer: &Option<String>) -> String {
    match signer {
        Some(who) => format!("{source}: signature verified, signed by {who}"),
        None => format!("{source}: not signed (no .minisig beside it); installing it as it is"),
    }
}

/// The id of the cloned commit's tree without the signature file in it (what the signer
/// signed: `git rev-parse HEAD^{tree}` before adding the file).
async fn tree_without_signature(repo: &Path, has_signature: bool) -> Result<String, String> {
    let git = |args: &[&str]| {
        let mut c = tokio::process::Command::new("git");
        c.env("GIT_ALLOW_PROTOCOL", "https:http:ssh:git:file")
            .args(["-c", "core.hooksPath=/dev/null", "-C"])
            .arg(repo)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        c
    };
    if has_signature {
        let out = git(&["rm", "-q", "--cached", "--", crate::signing::TREE_SIGNATURE])
            .output()
            .await
            .map_err(|e| format!("git rm: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{} is not a file of the commit (git rm: {})",
                crate::signing::TREE_SIGNATURE,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let args: &[&str] = if has_signature { &["write-tree"] } else { &["rev-parse", "HEAD^{tree}"] };
    let out = git(args).output().await.map_err(|e| format!("git {}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!("git {}: {}", args[0], String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Numbers the scratch folders of dry-run installs.
static PLANS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
