//! Signed plugins: `[install] trusted_keys` (minisign public keys) and `require_signatures`
//! in plugd.toml, checked before anything of a source runs; and `entrypoint_sha256` in a
//! manifest, checked before every exec.
//!
//! An archive (a local `.tar.gz`/`.zip`, or one fetched from a URL) is signed by a
//! detached minisign signature beside it: `<archive>.minisig` (for a URL, `<url>.minisig`
//! is fetched too). The signature covers the archive's bytes and is checked before the
//! archive is unpacked. A signature that is there but does not verify with a trusted key
//! always fails the install; a missing one fails it only with `require_signatures = true`.
//! A git source (`git+URL#ref`) is signed by a signature of its tree: the file
//! `.plugd/tree.minisig` in the repository holds a minisign signature of the text
//! `<tree id>\n`, where the tree id is that of the commit's tree *without* the signature
//! file (`git rev-parse HEAD^{tree}` before the file is added). plugd checks it right
//! after the clone, before the build or anything else of the tree runs.
//! Folder sources carry no signature: with `require_signatures = true` they are refused,
//! with the setting named.

use std::path::{Path, PathBuf};

use minisign_verify::{PublicKey, Signature};

/// The keys plugd trusts to sign plugins, and whether every install must be signed.
#[derive(Clone, Default)]
pub struct Trust {
    keys: Vec<(String, PublicKey)>,
    /// Refuse sources that are not signed by a trusted key.
    pub require: bool,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Trust").field("keys", &names).field("require", &self.require).finish()
    }
}

impl PartialEq for Trust {
    fn eq(&self, other: &Self) -> bool {
        self.require == other.require
            && self.keys.iter().map(|(n, _)| n).eq(other.keys.iter().map(|(n, _)| n))
    }
}

impl Trust {
    /// Reads `trusted_keys`: each a minisign public key (base64, as on the second line of a
    /// `minisign.pub` file) or the path of such a file (relative to `base`).
    pub fn from_config(keys: &[String], require: bool, base: &Path) -> Result<Trust, String> {
        let mut out = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let looks_like_key = k.len() == 56 && !k.contains('/') && !k.contains('.');
            let (name, key) = if looks_like_key {
                (format!("key {}", &k[..12]), PublicKey::from_base64(k))
            } else {
                let path = base.join(k);
                (path.display().to_string(), PublicKey::from_file(&path))
            };
            let key = key.map_err(|e| {
                format!("`install.trusted_keys[{i}]` = {k:?} is not a minisign public key (the base64 line of a minisign.pub, or its path): {e}")
            })?;
            out.push((name, key));
        }
        if require && out.is_empty() {
            return Err("`install.require_signatures = true` needs at least one key in `install.trusted_keys`".into());
        }
        Ok(Trust { keys: out, require })
    }

    /// Whether any key is trusted.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks `archive` against its detached signature (the text of `<archive>.minisig`,
    /// if there is one). Returns who signed it, `None` for an unsigned archive that may be
    /// installed, or why not.
    pub fn check_archive(
        &self,
        archive: &Path,
        signature: Option<&str>,
    ) -> Result<Option<String>, String> {
        let Some(text) = signature else {
            if self.require {
                return Err(format!(
                    "{} has no signature ({}.minisig) and plugd.toml says `install.require_signatures = true`; sign it with a trusted key (minisign -Sm {})",
                    archive.display(),
                    archive.display(),
                    archive.display()
                ));
            }
            return Ok(None);
        };
        let sig = Signature::decode(text).map_err(|e| {
            format!("{}.minisig is not a minisign signature: {e}", archive.display())
        })?;
        let bytes = std::fs::read(archive)
            .map_err(|e| format!("cannot read {}: {e}", archive.display()))?;
        for (name, key) in &self.keys {
            if key.verify(&bytes, &sig, false).is_ok() {
                return Ok(Some(format!("{name} ({})", sig.trusted_comment())));
            }
        }
        Err(format!(
            "the signature of {} does not verify with any key in `install.trusted_keys` ({} trusted); the archive was changed, or signed by a key plugd does not trust",
            archive.display(),
            self.keys.len()
        ))
    }

    /// Checks a signature of a git tree (the text `<tree id>\n`, as `git rev-parse
    /// HEAD^{tree}` prints it), if the repository carries one. Returns who signed it,
    /// `None` for an unsigned tree that may be installed, or why not.
    pub fn check_tree(
        &self,
        source: &str,
        tree: &str,
        signature: Option<&str>,
    ) -> Result<Option<String>, String> {
        let Some(text) = signature else {
            if self.require {
                return Err(format!(
                    "{source} has no {TREE_SIGNATURE} and plugd.toml says `install.require_signatures = true`; sign its tree with a trusted key (see README, Signed plugins)"
                ));
            }
            return Ok(None);
        };
        let sig = Signature::decode(text)
            .map_err(|e| format!("{source}: {TREE_SIGNATURE} is not a minisign signature: {e}"))?;
        let signed = format!("{tree}\n");
        for (name, key) in &self.keys {
            if key.verify(signed.as_bytes(), &sig, false).is_ok() {
                return Ok(Some(format!("{name} ({})", sig.trusted_comment())));
            }
        }
        Err(format!(
            "{source}: {TREE_SIGNATURE} does not verify the tree {tree} with any key in `install.trusted_keys`; the tree changed since it was signed, or the signer is not trusted"
        ))
    }

    /// Refuses a source kind that cannot carry a signature when signatures are required.
    pub fn check_unsigned_kind(&self, source: &str, kind: &str) -> Result<(), String> {
        if self.require {
            return Err(format!(
                "{source}: a {kind} carries no signature, and plugd.toml says `install.require_signatures = true`; install a signed archive (.tar.gz or .zip with its .minisig beside it) or a git repository with a signed tree"
            ));
        }
        Ok(())
    }
}

/// Where a git repository carries the signature of its tree.
pub const TREE_SIGNATURE: &str = ".plugd/tree.minisig";

/// The detached signature beside a local file, if any.
pub fn signature_beside(file: &Path) -> Option<String> {
    let mut sig = file.as_os_str().to_owned();
    sig.push(".minisig");
    std::fs::read_to_string(PathBuf::from(sig)).ok()
}

/// The SHA-256 of a file, as lowercase hex.
pub use supervisor::spawn::sha256_of;
