//! An in-memory model of the file tree being baked: a rootfs read from disk plus what the
//! builder adds (the init, its config, kernel modules, device nodes). Paths are resolved
//! inside the tree, following the tree's own symlinks (`/sbin -> usr/sbin` on merged-/usr
//! systems) without ever leaving its root.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What a node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A directory.
    Dir,
    /// A regular file copied from the host.
    HostFile {
        /// Source path.
        path: PathBuf,
        /// Size when the tree was read.
        size: u64,
    },
    /// A regular file with the given bytes.
    Bytes(Vec<u8>),
    /// A symbolic link.
    Symlink(String),
    /// A character device.
    CharDev(u32, u32),
    /// A block device.
    BlockDev(u32, u32),
    /// A FIFO.
    Fifo,
}

/// One node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What it holds.
    pub content: Content,
    /// Permission bits.
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

impl Node {
    /// A root-owned directory.
    pub fn dir(perm: u32) -> Node {
        Node {
            content: Content::Dir,
            perm,
            uid: 0,
            gid: 0,
        }
    }

    /// A root-owned node.
    pub fn root(content: Content, perm: u32) -> Node {
        Node {
            content,
            perm,
            uid: 0,
            gid: 0,
        }
    }
}

/// Why a tree operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// Reading the source tree failed.
    #[error("read {}", path.display())]
    Read {
        /// The host path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A host file name is not UTF-8 (cpio names here are UTF-8).
    #[error("{}: file name is not UTF-8", path.display())]
    Name {
        /// The host path.
        path: PathBuf,
    },
    /// A path cannot be placed in the tree.
    #[error("{path}: {reason}")]
    Place {
        /// The path in the tree.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The tree: relative paths (`bin/sh`) to nodes; the root itself is implicit.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

const MAX_LINK_HOPS: usize = 40;

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Tree::default()
    }

    /// The nodes in archive order: every directory before what it holds.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node at an exact (already resolved) path.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path.trim_start_matches('/'))
    }

    /// Reads a directory from the host into the tree (not following symlinks).
    /// Sockets are skipped. With `keep_owners` false every node is owned by root.
    pub fn add_host_dir(&mut self, root: &Path, keep_owners: bool) -> Result<(), TreeError> {
        let meta = std::fs::metadata(root).map_err(|source| TreeError::Read {
            path: root.to_owned(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(TreeError::Read {
                path: root.to_owned(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        self.walk(root, "", keep_owners)
    }

    fn walk(&mut self, dir: &Path, rel: &str, keep_owners: bool) -> Result<(), TreeError> {
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| TreeError::Read { path, source }
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_err(dir))? {
            let entry = entry.map_err(read_err(dir))?;
            names.push(entry.file_name());
        }
        names.sort();
        for name in names {
            let host = dir.join(&name);
            let name = name
                .to_str()
                .ok_or_else(|| TreeError::Name { path: host.clone() })?;
            let path = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::symlink_metadata(&host).map_err(read_err(&host))?;
            let ft = meta.file_type();
            let content = if ft.is_dir() {
                Content::Dir
            } else if ft.is_file() {
                Content::HostFile {
                    path: host.clone(),
                    size: meta.len(),
                }
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&host).map_err(read_err(&host))?;
                let target = target
                    .to_str()
                    .ok_or_else(|| TreeError::Name { path: host.clone() })?;
                Content::Symlink(target.to_owned())
            } else if ft.is_char_device() || ft.is_block_device() {
                let rdev = meta.rdev();
                let (major, minor) = (dev_major(rdev), dev_minor(rdev));
                if ft.is_char_device() {
                    Content::CharDev(major, minor)
                } else {
                    Content::BlockDev(major, minor)
                }
            } else if ft.is_fifo() {
                Content::Fifo
            } else {
                log::warn!("skipping socket {}", host.display());
                continue;
            };
            let (uid, gid) = if keep_owners {
                (meta.uid(), meta.gid())
            } else {
                (0, 0)
            };
            let is_dir = content == Content::Dir;
            self.nodes.insert(
                path.clone(),
                Node {
                    content,
                    perm: meta.permissions().mode() & 0o7777,
                    uid,
                    gid,
                },
            );
            if is_dir {
                self.walk(&host, &path, keep_owners)?;
            }
        }
        Ok(())
    }

    /// Resolves `path` inside the tree: symlinks met on the way (but not the last component)
    /// are followed within the tree, `..` never climbs above the root. Returns the resolved
    /// relative path.
    pub fn resolve_parent(&self, path: &str) -> Result<String, TreeError> {
        let place = |reason: &str| TreeError::Place {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_owned)
            .collect();
        let last = parts.pop().ok_or_else(|| place("empty path"))?;
        if last == ".." {
            return Err(place("path ends in .."));
        }
        let mut resolved: Vec<String> = Vec::new();
        let mut pending: std::collections::VecDeque<String> = parts.into();
        let mut hops = 0;
        while let Some(comp) = pending.pop_front() {
            if comp == ".." {
                resolved.pop();
                continue;
            }
            resolved.push(comp);
            let here = resolved.join("/");
            match self.nodes.get(&here).map(|n| &n.content) {
                Some(Content::Symlink(target)) => {
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err(place("too many levels of symbolic links"));
                    }
                    resolved.pop();
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    for c in target
                        .split('/')
                        .rev()
                        .filter(|c| !c.is_empty() && *c != ".")
                    {
                        pending.push_front(c.to_owned());
                    }
                }
                Some(Content::Dir) | None => {}
                Some(_) => return Err(place(&format!("{here} is not a directory"))),
            }
        }
        resolved.push(last);
        Ok(resolved.join("/"))
    }

    /// Places a node at `path` (resolved inside the tree), creating missing parent
    /// directories (0755, root). Replaces what was there unless it is a directory with
    /// contents being replaced by a non-directory. Returns the resolved path.
    pub fn put(&mut self, path: &str, node: Node) -> Result<String, TreeError> {
        let resolved = self.resolve_parent(path)?;
        let mut prefix = String::new();
        let comps: Vec<&str> = resolved.split('/').collect();
        for comp in comps.iter().take(comps.len().saturating_sub(1)) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(comp);
            self.nodes
                .entry(prefix.clone())
                .or_insert_with(|| Node::dir(0o755));
        }
        if let Some(old) = self.nodes.get(&resolved) {
            if old.content == Content::Dir && node.content != Content::Dir {
                let child = format!("{resolved}/");
                if self
                    .nodes
                    .range(child.clone()..)
                    .next()
                    .is_some_and(|(k, _)| k.starts_with(&child))
                {
                    return Err(TreeError::Place {
                        path: path.to_owned(),
                        reason: "a non-empty directory is there".to_owned(),
                    });
                }
            }
            if old.content == Content::Dir && node.content == Content::Dir {
                // Keep the existing directory (and its mode) as it is.
                return Ok(resolved);
            }
        }
        self.nodes.insert(resolved.clone(), node);
        Ok(resolved)
    }
}

/// Major number of a Linux `dev_t`.
pub fn dev_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

/// Minor number of a Linux `dev_t`.
pub fn dev_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_with_links() -> Tree {
        let mut t = Tree::new();
        for d in ["usr", "usr/sbin", "usr/lib", "etc"] {
            t.put(d, Node::dir(0o755)).expect("dir");
        }
        t.put(
            "sbin",
            Node::root(Content::Symlink("usr/sbin".into()), 0o777),
        )
        .expect("link");
        t.put(
            "lib",
            Node::root(Content::Symlink("/usr/lib".into()), 0o777),
        )
        .expect("link");
        t.put(
            "escape",
            Node::root(Content::Symlink("../../..".into()), 0o777),
        )
        .expect("link");
        t.put("loop", Node::root(Content::Symlink("loop".into()), 0o777))
            .expect("link");
        t.put(
            "etc/passwd",
            Node::root(Content::Bytes(b"x".to_vec()), 0o644),
        )
        .expect("file");
        t
    }

    #[test]
    fn resolves_inside_the_tree() {
        let t = tree_with_links();
        let cases: &[(&str, &str)] = &[
            ("/sbin/bootlace-init", "usr/sbin/bootlace-init"),
            (
                "lib/modules/6.1/modules.dep",
                "usr/lib/modules/6.1/modules.dep",
            ),
            ("/escape/etc/x", "etc/x"),
            ("../../etc/x", "etc/x"),
            ("./a/./b", "a/b"),
            ("/sbin", "sbin"),
        ];
        for (path, want) in cases {
            assert_eq!(t.resolve_parent(path).expect(path), *want, "{path}");
        }
        for bad in ["", "/", "loop/x", "etc/passwd/x", "a/.."] {
            assert!(t.resolve_parent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn put_creates_parents_and_keeps_directories() {
        let mut t = tree_with_links();
        let p = t
            .put(
                "/lib/modules/r/kernel/x.ko",
                Node::root(Content::Bytes(vec![1]), 0o644),
            )
            .expect("put");
        assert_eq!(p, "usr/lib/modules/r/kernel/x.ko");
        assert_eq!(
            t.get("usr/lib/modules/r").map(|n| &n.content),
            Some(&Content::Dir)
        );
        t.put("etc", Node::dir(0o700)).expect("dir again");
        assert_eq!(t.get("etc").map(|n| n.perm), Some(0o755));
        let err = t
            .put("etc", Node::root(Content::Bytes(vec![]), 0o644))
            .expect_err("replace non-empty dir");
        assert!(err.to_string().contains("non-empty directory"));
    }

    #[test]
    fn dev_numbers() {
        // makedev(5, 1) and makedev(259, 70000)
        assert_eq!((dev_major(0x501), dev_minor(0x501)), (5, 1));
        let dev: u64 = (259 & 0xfff) << 8 | (70000 & 0xff) | ((70000 & !0xff) << 12);
        assert_eq!((dev_major(dev), dev_minor(dev)), (259, 70000));
    }
}
