//! Landlock, the second file-system layer (the jail's mount namespace is the first).
//!
//! The plugin may read its own folder, its executable, its interpreter and the system's
//! library folders; write only its state folder, its private `/tmp` and declared extra
//! paths; execute only its entrypoint and the interpreter that runs it (plus the dynamic
//! loader), unless `sandbox.execve = true`. Nothing anywhere may create device nodes.
//! Where the ABI has them, TCP bind/connect are denied (with `network = "none"`) and the
//! plugin is scoped: no signals and no abstract unix sockets outside its domain.
//!
//! The access masks come from the `landlock` crate, but the ruleset itself is created
//! with raw syscalls in the child, after `pivot_root`: the jail's own mounts (`/etc`,
//! `/dev`, `/tmp`, `/proc`) do not exist before the fork, and the crate's builder
//! allocates, which the child may not do. [`Rules`] is prepared in the supervisor; the
//! child only opens paths and makes the three Landlock syscalls.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use landlock::{Access, AccessFs, AccessNet, BitFlags, Scope, ABI};

/// What one rule grants beneath a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Read files and list folders.
    Read,
    /// Read and execute (an entrypoint, an interpreter, the dynamic loader).
    Exec,
    /// Read, write, create and remove — but never device nodes, never execute.
    Write,
    /// Read and write existing device nodes (`/dev/null` and friends).
    Device,
}

/// The Landlock ABI the running kernel supports (0 = none).
pub fn kernel_abi() -> i32 {
    // SAFETY: with a null attribute pointer, size 0 and LANDLOCK_CREATE_RULESET_VERSION the
    // call only returns the ABI version (or an error); no memory is read or written.
    let v = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32)
    };
    if v < 0 {
        0
    } else {
        v as i32
    }
}

fn abi_enum(v: i32) -> ABI {
    match v {
        i32::MIN..=0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        6 => ABI::V6,
        // The crate's newest ABI covers every right it knows; newer kernels keep them.
        _ => ABI::V7,
    }
}

/// `struct landlock_ruleset_attr` (uapi); the size passed tells the kernel which fields exist.
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_path_beneath_attr` (uapi, packed).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;

/// One rule, ready for the child.
#[derive(Debug)]
struct Rule {
    path: CString,
    access: u64,
}

/// A ruleset prepared before the fork and created in the child (see the module doc).
#[derive(Debug)]
pub struct Rules {
    abi: i32,
    attr_size: usize,
    handled_fs: u64,
    handled_net: u64,
    scoped: u64,
    rules: Vec<Rule>,
}

impl Rules {
    /// Plans the rules. `rules` are paths as the plugin will see them, with what each gets;
    /// `deny_tcp` also takes TCP bind/connect away where the ABI can. Paths that do not
    /// exist are left out (a declared extra path that is missing grants nothing).
    pub fn plan(rules: &[(PathBuf, Grant)], deny_tcp: bool) -> Result<Rules, String> {
        let v = kernel_abi();
        if v <= 0 {
            return Err(
                "the kernel has no Landlock (needs Linux 5.13+ with landlock in the lsm= list)"
                    .into(),
            );
        }
        let abi = abi_enum(v);
        let all = AccessFs::from_all(abi);
        let read = AccessFs::from_read(abi) & !BitFlags::from(AccessFs::Execute);
        let file_only = AccessFs::from_file(abi);
        let devices = BitFlags::from(AccessFs::MakeChar) | AccessFs::MakeBlock;
        let write = (all & !devices) & !BitFlags::from(AccessFs::Execute);
        let mut out = Vec::new();
        for (path, grant) in rules {
            let Ok(meta) = std::fs::metadata(path) else { continue };
            let mut access = match grant {
                Grant::Read => read,
                Grant::Exec => read | AccessFs::Execute,
                Grant::Write => write,
                Grant::Device => file_only & !BitFlags::from(AccessFs::Execute),
            };
            if !meta.is_dir() {
                access &= file_only;
            }
            let path = CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|_| format!("{} contains a NUL byte", path.display()))?;
            out.push(Rule { path, access: access.bits() });
        }
        let handled_net = if deny_tcp { AccessNet::from_all(abi).bits() } else { 0 };
        let scoped = Scope::from_all(abi).bits();
        let attr_size = match v {
            1..=3 => 8,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        Ok(Rules { abi: v, attr_size, handled_fs: all.bits(), handled_net, scoped, rules: out })
    }

    /// The ABI in use, for the report.
    pub fn abi(&self) -> i32 {
        self.abi
    }

    /// Whether signals and abstract sockets are scoped to the plugin (ABI 6+).
    pub fn scoped(&self) -> bool {
        self.scoped != 0
    }

    /// Whether TCP is denied by Landlock too (ABI 4+ and `network = "none"`).
    pub fn denies_tcp(&self) -> bool {
        self.handled_net != 0
    }

    /// Creates the ruleset and restricts the calling process. Runs in the child between
    /// fork and exec: raw syscalls on data prepared before the fork, no allocation.
    pub fn restrict_self(&self) -> io::Result<()> {
        let attr = RulesetAttr {
            handled_access_fs: self.handled_fs,
            handled_access_net: self.handled_net,
            scoped: self.scoped,
        };
        // SAFETY: `attr` is a live, initialised struct and `attr_size` never exceeds its size;
        // the kernel only reads it.
        let ruleset = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                self.attr_size,
                0u32,
            )
        };
        if ruleset < 0 {
            return Err(io::Error::last_os_error());
        }
        let ruleset = ruleset as libc::c_int;
        let result = self.add_rules_and_restrict(ruleset);
        // SAFETY: `ruleset` is the descriptor created above and is closed exactly once.
        unsafe { libc::close(ruleset) };
        result
    }

    fn add_rules_and_restrict(&self, ruleset: libc::c_int) -> io::Result<()> {
        for rule in &self.rules {
            // SAFETY: a NUL-terminated path prepared before the fork; O_PATH opens nothing
            // for reading and the descriptor is closed below.
            let fd = unsafe { libc::open(rule.path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                // Planned from the host's view; a path the jail does not show is skipped.
                continue;
            }
            let attr = PathBeneathAttr { allowed_access: rule.access, parent_fd: fd };
            // SAFETY: `attr` is a live packed struct the kernel only reads; `fd` is ours.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset,
                    LANDLOCK_RULE_PATH_BENEATH,
                    &attr as *const PathBeneathAttr,
                    0u32,
                )
            };
            let err = io::Error::last_os_error();
            // SAFETY: `fd` was opened above and is closed exactly once.
            unsafe { libc::close(fd) };
            if rc != 0 {
                return Err(err);
            }
        }
        // SAFETY: landlock_restrict_self takes a descriptor and flags; no memory is passed.
        if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The program that really runs when `program` is executed: the file behind symlinks, the
/// interpreter of a `#!` script, and the ELF interpreter (dynamic loader) of each. Every
/// one of them needs Landlock's EXECUTE right.
pub fn executables_behind(program: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut next = std::fs::canonicalize(program).ok();
    // A script's interpreter may itself be a script; three levels is plenty.
    for _ in 0..3 {
        let Some(file) = next.take() else { break };
        let head = read_head(&file);
        if let Some(interp) = shebang(&head) {
            next = std::fs::canonicalize(interp).ok();
        } else if let Some(loader) = elf_interpreter(&file, &head) {
            if let Ok(loader) = std::fs::canonicalize(loader) {
                out.push(loader);
            }
        }
        out.push(file);
    }
    out
}

fn read_head(file: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut head = vec![0u8; 4096];
    let n = std::fs::File::open(file).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
    head.truncate(n);
    head
}

fn shebang(head: &[u8]) -> Option<PathBuf> {
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let text = std::str::from_utf8(line).ok()?.trim();
    let interp = text.split_whitespace().next()?;
    Some(PathBuf::from(interp))
}

/// PT_INTERP of a 64-bit little-endian ELF file, if it has one.
fn elf_interpreter(file: &Path, head: &[u8]) -> Option<PathBuf> {
    use std::os::unix::fs::FileExt;
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]) as u64;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let (phoff, phentsize, phnum) = (u64_at(head, 32), u16_at(54), u16_at(56));
    let f = std::fs::File::open(file).ok()?;
    for i in 0..phnum.min(64) {
        let mut ph = [0u8; 56];
        f.read_exact_at(&mut ph, phoff + i * phentsize).ok()?;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == 3 {
            let (off, size) = (u64_at(&ph, 8), u64_at(&ph, 32).min(4096));
            let mut name = vec![0u8; size as usize];
            f.read_exact_at(&mut name, off).ok()?;
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            return Some(PathBuf::from(std::str::from_utf8(&name[..end]).ok()?));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_test_binary_needs_its_loader() {
        let exe = std::env::current_exe().unwrap();
        let found = executables_behind(&exe);
        assert!(found.contains(&std::fs::canonicalize(&exe).unwrap()), "{found:?}");
        assert!(
            found.iter().any(|p| p.to_string_lossy().contains("ld-linux")),
            "a dynamically linked test binary has a loader: {found:?}"
        );
    }

    #[test]
    fn a_script_needs_its_interpreter() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("run");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let found = executables_behind(&script);
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        assert!(found.contains(&sh), "{found:?}");
    }

    #[test]
    fn file_rules_keep_only_file_rights() {
        if kernel_abi() <= 0 {
            return; // nothing to plan on a kernel without Landlock (the layer is reported)
        }
        let exe = std::env::current_exe().unwrap();
        let r = Rules::plan(&[(exe, Grant::Write), ("/usr".into(), Grant::Read)], true).unwrap();
        let make_char = BitFlags::from(AccessFs::MakeChar).bits();
        let make_block = BitFlags::from(AccessFs::MakeBlock).bits();
        let exec = BitFlags::from(AccessFs::Execute).bits();
        for rule in &r.rules {
            assert_eq!(rule.access & (make_char | make_block | exec), 0, "{rule:?}");
        }
        assert_eq!(r.rules.len(), 2);
    }
}
