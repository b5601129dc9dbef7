//! The kernel-module indexes of a baked image. An image that has its own
//! `lib/modules/<release>` (a distribution root) keeps every module and index line of its own:
//! the bake adds the modules it copies that the image lacks, appends their lines to the image's
//! `modules.dep`, and rewrites the binary indexes (`modules.dep.bin`, `modules.alias.bin`, …,
//! which kmod and systemd read before the text) with `depmod` over both, so none is stale. An
//! image without its own gets the modules the bake copies, a `modules.dep` for exactly those
//! and their binary indexes.
//!
//! `depmod` runs on a tree of symbolic links made in the bake's work directory: to the image's
//! module files, found by a walk that never follows a link out of the input (only regular files
//! are linked), and to the files the bake copies. Its configuration is an empty directory, so
//! the host's `/etc/depmod.d` changes nothing.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

/// The module files and the module-tree files of an image's `lib/modules/<release>`.
#[derive(Debug, Default)]
pub struct ImageModules {
    /// The directory on the host (the input's, resolved inside it).
    pub dir: PathBuf,
    /// Paths of its module files (`*.ko`, `*.ko.xz`, …), relative to `dir`.
    pub files: BTreeSet<String>,
    /// Its `modules.dep`, when it has one.
    pub dep: Option<String>,
    /// Which of `modules.builtin`, `modules.builtin.modinfo`, `modules.order` it has.
    pub meta: BTreeSet<String>,
}

/// Files of a module tree that depmod reads, not writes.
const META: [&str; 3] = [
    "modules.builtin",
    "modules.builtin.modinfo",
    "modules.order",
];

/// Directories of a module tree that hold no modules of this kernel (links to its headers).
const SKIPPED: [&str; 2] = ["build", "source"];

/// The largest `modules.dep` read from an image (Debian's is about 400 KiB).
const MAX_DEP_BYTES: u64 = 16 << 20;

/// Why the module indexes could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DepmodError {
    /// Reading the image's module tree failed.
    #[error("read the image's modules at {}/{path}", dir.display())]
    Read {
        /// The image's modules directory.
        dir: PathBuf,
        /// What was being read, relative to it.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image's `modules.dep` is too large or not UTF-8.
    #[error("{}/modules.dep: {problem}", dir.display())]
    Dep {
        /// The image's modules directory.
        dir: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
    /// Making the link tree for depmod failed.
    #[error("prepare {} for depmod", path.display())]
    Tree {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// depmod could not be run.
    #[error("run depmod (kmod; `make setup` installs it): {0}")]
    Spawn(#[source] io::Error),
    /// depmod failed.
    #[error("depmod -b {} {release} failed: {stderr}", base.display())]
    Failed {
        /// The link tree.
        base: PathBuf,
        /// The release.
        release: String,
        /// What depmod said.
        stderr: String,
    },
}

/// Reads the image's module tree: `dir` is its `lib/modules/<release>` opened inside the input
/// (`host`: the same directory's path on the host).
pub fn scan(dir: OwnedFd, host: PathBuf) -> Result<ImageModules, DepmodError> {
    let mut found = ImageModules {
        dir: host,
        ..ImageModules::default()
    };
    walk(&dir, "", &mut found)?;
    for name in META {
        if found.files.remove(name) {
            found.meta.insert(name.to_owned());
        }
    }
    if found.files.remove("modules.dep") {
        let bytes = read_capped(&dir, "modules.dep").map_err(|source| DepmodError::Read {
            dir: found.dir.clone(),
            path: "modules.dep".to_owned(),
            source,
        })?;
        let Some(bytes) = bytes else {
            return Err(DepmodError::Dep {
                dir: found.dir.clone(),
                problem: "over 16 MiB",
            });
        };
        let text = String::from_utf8(bytes).map_err(|_| DepmodError::Dep {
            dir: found.dir.clone(),
            problem: "not UTF-8",
        })?;
        found.dep = Some(text);
    }
    // What is left that is not a module (the image's old indexes) is rewritten or ignored.
    found.files.retain(|f| is_module(f));
    Ok(found)
}

/// Whether a file name is a kernel module's.
fn is_module(path: &str) -> bool {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .any(|s| path.ends_with(s))
}

/// The regular files under `dir` (relative to the tree's top, with `prefix`), never following a
/// link; the top level's module-tree files are listed too.
fn walk(dir: &OwnedFd, prefix: &str, found: &mut ImageModules) -> Result<(), DepmodError> {
    let top = found.dir.clone();
    let err = |path: &str, source: io::Error| DepmodError::Read {
        dir: top.clone(),
        path: path.to_owned(),
        source,
    };
    let mut entries = Vec::new();
    let listing = Dir::read_from(dir).map_err(|e| err(prefix, e.into()))?;
    for entry in listing {
        let entry = entry.map_err(|e| err(prefix, e.into()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            entries.push(name);
        }
    }
    entries.sort();
    for name in entries {
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let st = rustix::fs::statat(dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| err(&rel, e.into()))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory if !(prefix.is_empty() && SKIPPED.contains(&name.as_str())) => {
                let sub = rustix::fs::openat(
                    dir,
                    name.as_str(),
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| err(&rel, e.into()))?;
                walk(&sub, &rel, found)?;
            }
            FileType::RegularFile => {
                found.files.insert(rel);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The file `name` in `dir`, when it is at most [`MAX_DEP_BYTES`].
fn read_capped(dir: &OwnedFd, name: &str) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read as _;
    let fd = rustix::fs::openat(
        dir.as_fd(),
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_DEP_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= MAX_DEP_BYTES).then_some(bytes))
}

/// The image's `modules.dep` with a line added for each module it lacks (`ours`: the lines of
/// the modules the bake copies).
pub fn merged_dep(image: &str, ours: &str) -> String {
    let listed: BTreeSet<&str> = image
        .lines()
        .filter_map(|l| l.split_once(':').map(|(m, _)| m))
        .collect();
    let mut out = image.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for line in ours.lines() {
        let module = line.split_once(':').map_or(line, |(m, _)| m);
        if !listed.contains(module) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Runs depmod for `release` over the image's modules (if any) and `added` (path relative to
/// the module directory -> the host file), in `work` (made here). Returns the index files it
/// wrote (name -> file in `work`), all but the text `modules.dep`, which the caller writes.
pub fn indexes(
    release: &str,
    image: Option<&ImageModules>,
    added: &[(String, PathBuf)],
    work: &Path,
) -> Result<Vec<(String, PathBuf)>, DepmodError> {
    let top = work.join("lib/modules").join(release);
    let tree = |path: &Path| {
        let path = path.to_owned();
        move |source| DepmodError::Tree { path, source }
    };
    std::fs::create_dir_all(&top).map_err(tree(&top))?;
    let config = work.join("depmod.d");
    std::fs::create_dir_all(&config).map_err(tree(&config))?;
    let link = |rel: &str, to: &Path| -> Result<(), DepmodError> {
        let at = top.join(rel);
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent).map_err(tree(parent))?;
        }
        match std::os::unix::fs::symlink(to, &at) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            r => r.map_err(tree(&at)),
        }
    };
    if let Some(image) = image {
        for rel in image.files.iter().chain(image.meta.iter()) {
            link(rel, &image.dir.join(rel))?;
        }
    }
    for (rel, host) in added {
        link(rel, host)?;
    }
    let out = Command::new("depmod")
        .arg("-b")
        .arg(work)
        .arg("-C")
        .arg(&config)
        .arg(release)
        .output()
        .map_err(DepmodError::Spawn)?;
    if !out.status.success() {
        return Err(DepmodError::Failed {
            base: work.to_owned(),
            release: release.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let mut written = Vec::new();
    for entry in std::fs::read_dir(&top).map_err(tree(&top))? {
        let entry = entry.map_err(tree(&top))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map_err(tree(&entry.path()))?.is_file();
        if is_file && name.starts_with("modules.") && name != "modules.dep" {
            written.push((name, entry.path()));
        }
    }
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_images_lines_stay_and_its_missing_modules_are_added() {
        let image = "kernel/fs/a.ko:\nkernel/fs/b.ko: kernel/fs/a.ko";
        let ours = "kernel/fs/b.ko: kernel/fs/a.ko\nkernel/net/c.ko:\n";
        assert_eq!(
            merged_dep(image, ours),
            "kernel/fs/a.ko:\nkernel/fs/b.ko: kernel/fs/a.ko\nkernel/net/c.ko:\n"
        );
        assert_eq!(merged_dep("", "x.ko:\n"), "x.ko:\n");
    }

    #[test]
    fn only_module_files_are_modules() {
        assert!(is_module("kernel/a.ko") && is_module("kernel/b.ko.xz"));
        assert!(!is_module("modules.dep.bin") && !is_module("kernel/a.ko.sig"));
    }
}
