//! What a capture never bakes, whatever the guest wrote: the bootstrap, the run's machine
//! identity and host keys, run-time and random state, the run-once records of the capture
//! boot, and any file holding a secret the bundle delivered without copying it into the root.
//!
//! Every path is resolved inside the captured tree (`openat2` with `RESOLVE_IN_ROOT`): a
//! symlink the guest planted (`/etc/ssh -> /`) resolves in the tree, never on the host.

use std::io::{self, Read as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::stage::remove_all;

/// One rule of the exclusion list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The directory stays (a mount point), its contents go.
    Contents(&'static str),
    /// A regular file is emptied (as systemd images ship `/etc/machine-id`); a symlink stays.
    Empty(&'static str),
    /// The file or directory goes; a symlink at that path goes too.
    Remove(&'static str),
    /// In the directory, every entry whose name starts with the prefix goes.
    Prefix(&'static str, &'static str),
}

/// The fixed list, in the order applied (documented in docs/image.md, "Capture").
pub const RULES: &[Rule] = &[
    Rule::Contents("/.bootstrap"),
    Rule::Contents("/run"),
    Rule::Contents("/tmp"),
    Rule::Empty("/etc/machine-id"),
    Rule::Remove("/var/lib/dbus/machine-id"),
    Rule::Prefix("/etc/ssh", "ssh_host_"),
    Rule::Remove("/var/lib/systemd/random-seed"),
    Rule::Remove("/var/lib/systemd/credential.secret"),
    Rule::Remove("/var/lib/random-seed"),
];

/// Opens `root` (a directory on the host) for resolving paths inside it.
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The directory `rel` (relative to the tree's root, `etc/ssh`; `""` is the root), resolved
/// inside the tree; `None` when it is missing or not a directory.
fn open_dir_in(root: BorrowedFd<'_>, rel: &str) -> io::Result<Option<OwnedFd>> {
    let rel = if rel.is_empty() { "." } else { rel };
    match rustix::fs::openat2(
        root,
        rel,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `/etc/ssh` -> (`etc`, `ssh`).
fn parent_and_name(path: &str) -> (&str, &str) {
    let rel = path.trim_start_matches('/');
    match rel.rsplit_once('/') {
        Some((p, n)) => (p, n),
        None => ("", rel),
    }
}

/// The names in a directory, `.` and `..` left out.
fn names(dir: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let n = entry.file_name().to_string_lossy().into_owned();
        if n != "." && n != ".." {
            out.push(n);
        }
    }
    out.sort();
    Ok(out)
}

/// Applies one rule; returns the paths it changed, in the tree's terms (`/etc/ssh/ssh_host_rsa_key`).
pub fn apply_rule(root: BorrowedFd<'_>, rule: Rule) -> io::Result<Vec<String>> {
    let mut done = Vec::new();
    match rule {
        Rule::Contents(dir) => {
            let Some(fd) = open_dir_in(root, dir.trim_start_matches('/'))? else {
                return Ok(done);
            };
            for n in names(fd.as_fd())? {
                remove_all(fd.as_fd(), &n)?;
                done.push(format!("{dir}/{n}"));
            }
        }
        Rule::Empty(path) => {
            let (parent, name) = parent_and_name(path);
            let Some(fd) = open_dir_in(root, parent)? else {
                return Ok(done);
            };
            let flags = OFlags::WRONLY | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
                    if st.st_size > 0 {
                        rustix::fs::openat(&fd, name, flags, Mode::empty())?;
                        done.push(format!("{path} (emptied)"));
                    }
                }
                Ok(_) | Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Rule::Remove(path) => {
            let (parent, name) = parent_and_name(path);
            if let Some(fd) = open_dir_in(root, parent)? {
                match remove_all(fd.as_fd(), name) {
                    Ok(()) => done.push(path.to_owned()),
                    Err(Errno::NOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Rule::Prefix(dir, prefix) => {
            let Some(fd) = open_dir_in(root, dir.trim_start_matches('/'))? else {
                return Ok(done);
            };
            for n in names(fd.as_fd())?
                .into_iter()
                .filter(|n| n.starts_with(prefix))
            {
                remove_all(fd.as_fd(), &n)?;
                done.push(format!("{dir}/{n}"));
            }
        }
    }
    Ok(done)
}

/// Applies [`RULES`], then removes the run-once records of the capture boot
/// (`<state_dir>/instances`, the manifest's state directory); returns what was changed.
pub fn apply_all(root: &Path, state_dir: &str) -> io::Result<Vec<String>> {
    let fd = open_root(root)?;
    let mut done = Vec::new();
    for rule in RULES {
        done.extend(apply_rule(fd.as_fd(), *rule)?);
    }
    let instances = format!("{}/instances", state_dir.trim_end_matches('/'));
    let (p, n) = parent_and_name(&instances);
    if let Some(dfd) = open_dir_in(fd.as_fd(), p)? {
        match remove_all(dfd.as_fd(), n) {
            Ok(()) => done.push(instances.clone()),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// A secret of the bundle: what it is (`bundle file secrets/token`, `env API_KEY`) and its
/// bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// What it is, for messages (never the value).
    pub what: String,
    /// The value.
    pub value: Vec<u8>,
}

/// A secret shorter than this is only matched as a whole file, never searched for inside one
/// (a short value would match by chance).
pub const MIN_SEARCHED: usize = 8;

/// Files larger than this are not searched (nor removed) for secrets.
pub const MAX_SEARCHED: u64 = 64 << 20;

/// A file of the tree that holds a secret within other content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    /// The path in the tree.
    pub path: String,
    /// Which secret.
    pub what: String,
}

fn trim_end(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    b.get(..end).unwrap_or(b)
}

/// Walks the tree (never following a symlink): a regular file whose whole content is a secret
/// (trailing white space aside) is removed and listed in the first vector; one that holds a
/// secret of at least [`MIN_SEARCHED`] bytes among other content is listed in the second.
pub fn remove_secrets(root: &Path, secrets: &[Secret]) -> io::Result<(Vec<String>, Vec<Leak>)> {
    let mut removed = Vec::new();
    let mut leaks = Vec::new();
    let wanted: Vec<&Secret> = secrets
        .iter()
        .filter(|s| !trim_end(&s.value).is_empty())
        .collect();
    if wanted.is_empty() {
        return Ok((removed, leaks));
    }
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(&rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let child = rel.join(e.file_name());
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(child);
                continue;
            }
            if !ft.is_file() || e.metadata()?.len() > MAX_SEARCHED {
                continue;
            }
            let mut content = Vec::new();
            std::fs::File::open(e.path())?.read_to_end(&mut content)?;
            let shown = format!("/{}", child.display());
            let body = trim_end(&content);
            if wanted.iter().any(|s| trim_end(&s.value) == body) {
                std::fs::remove_file(e.path())?;
                removed.push(shown);
            } else if let Some(s) = wanted.iter().find(|s| {
                let v = trim_end(&s.value);
                v.len() >= MIN_SEARCHED && body.windows(v.len()).any(|w| w == v)
            }) {
                leaks.push(Leak {
                    path: shown,
                    what: s.what.clone(),
                });
            }
        }
    }
    removed.sort();
    Ok((removed, leaks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        let r = d.path();
        for dir in [
            ".bootstrap/x",
            "run/bootlace",
            "tmp",
            "etc/ssh",
            "var/lib/dbus",
            "var/lib/bootlace/instances/i-1",
            "var/lib/systemd",
        ] {
            fs::create_dir_all(r.join(dir)).expect("mkdir");
        }
        for (f, c) in [
            (".bootstrap/x/secret", "s"),
            ("run/bootlace/notify", ""),
            ("tmp/scratch", "t"),
            ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
            ("var/lib/dbus/machine-id", "0123\n"),
            ("etc/ssh/ssh_host_ed25519_key", "k"),
            ("etc/ssh/ssh_host_ed25519_key.pub", "p"),
            ("etc/ssh/sshd_config", "keep"),
            ("var/lib/bootlace/instances/i-1/setup.done", ""),
            ("var/lib/systemd/random-seed", "r"),
            ("etc/hostname", "web\n"),
        ] {
            fs::write(r.join(f), c).expect("write");
        }
        d
    }

    #[test]
    fn the_list_removes_what_must_never_be_captured_and_keeps_the_rest() {
        let d = tree();
        let r = d.path();
        let done = apply_all(r, "/var/lib/bootlace").expect("apply");
        assert!(
            done.contains(&"/etc/ssh/ssh_host_ed25519_key".to_owned()),
            "{done:?}"
        );
        assert!(fs::read_dir(r.join(".bootstrap"))
            .expect("dir")
            .next()
            .is_none());
        assert!(fs::read_dir(r.join("run")).expect("dir").next().is_none());
        assert!(fs::read_dir(r.join("tmp")).expect("dir").next().is_none());
        assert_eq!(fs::read(r.join("etc/machine-id")).expect("mid"), b"");
        assert!(!r.join("var/lib/dbus/machine-id").exists());
        assert!(!r.join("etc/ssh/ssh_host_ed25519_key.pub").exists());
        assert!(r.join("etc/ssh/sshd_config").exists());
        assert!(!r.join("var/lib/bootlace/instances").exists());
        assert!(r.join("var/lib/bootlace").is_dir());
        assert!(!r.join("var/lib/systemd/random-seed").exists());
        assert_eq!(fs::read(r.join("etc/hostname")).expect("h"), b"web\n");
        // Applied again: nothing left to do.
        assert_eq!(
            apply_all(r, "/var/lib/bootlace").expect("again"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_planted_symlink_resolves_inside_the_tree() {
        let outside = tempfile::tempdir().expect("outside");
        fs::write(outside.path().join("ssh_host_rsa_key"), "host").expect("write");
        let d = tempfile::tempdir().expect("tempdir");
        fs::create_dir(d.path().join("etc")).expect("etc");
        std::os::unix::fs::symlink(outside.path(), d.path().join("etc/ssh")).expect("link");
        std::os::unix::fs::symlink(
            outside.path().join("ssh_host_rsa_key"),
            d.path().join("etc/machine-id"),
        )
        .expect("link");
        apply_all(d.path(), "/var/lib/bootlace").expect("apply");
        assert_eq!(
            fs::read(outside.path().join("ssh_host_rsa_key")).expect("kept"),
            b"host"
        );
    }

    #[test]
    fn secrets_are_removed_whole_and_named_when_embedded() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = d.path();
        fs::create_dir_all(r.join("etc/app")).expect("mkdir");
        fs::write(r.join("etc/app/token"), "s3cret-token-value\n").expect("w");
        fs::write(r.join("etc/app/app.conf"), "listen = 80\n").expect("w");
        fs::write(r.join("etc/app/env"), "KEY=hunter2-hunter2 # oops\n").expect("w");
        std::os::unix::fs::symlink("/etc/passwd", r.join("etc/app/link")).expect("link");
        let secrets = [
            Secret {
                what: "bundle file secrets/token".into(),
                value: b"s3cret-token-value".to_vec(),
            },
            Secret {
                what: "env KEY".into(),
                value: b"hunter2-hunter2".to_vec(),
            },
        ];
        let (removed, leaks) = remove_secrets(r, &secrets).expect("scan");
        assert_eq!(removed, ["/etc/app/token"]);
        assert_eq!(
            leaks,
            [Leak {
                path: "/etc/app/env".into(),
                what: "env KEY".into()
            }]
        );
        assert!(r.join("etc/app/app.conf").exists());
    }
}
