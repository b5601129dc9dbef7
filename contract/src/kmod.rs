//! Kernel module dependency resolution from `modules.dep` and `modules.builtin`, without
//! modprobe. Used by the init (to load modules) and by the image builder (to copy a module's
//! dependency closure into an image).
//!
//! `modules.dep` lines look like `kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko`;
//! a module is named by its file name without `.ko[.xz|.zst|.gz]`, with `-` read as `_`.
//! Soft dependencies (`modules.softdep`) are not followed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Why modules could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    /// An index file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line of `modules.dep` is not `path: deps…`.
    #[error("{}:{line}: malformed line", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A requested module is neither in `modules.dep` nor built in.
    #[error("module {name:?} not found in {} or modules.builtin", dir.display())]
    NotFound {
        /// The module.
        name: String,
        /// The module directory searched.
        dir: PathBuf,
    },
    /// `modules.dep` has a dependency cycle (a broken index).
    #[error("dependency cycle through module {name:?}")]
    Cycle {
        /// A module on the cycle.
        name: String,
    },
}

/// One loadable module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Canonical name (`_`, no suffix).
    pub name: String,
    /// Path relative to the module directory, as in `modules.dep`.
    pub path: String,
    /// Dependencies, canonical names, as listed.
    pub deps: Vec<String>,
}

impl Module {
    /// Whether the file is compressed (the kernel decompresses it when loading with
    /// `MODULE_INIT_COMPRESSED_FILE`).
    pub fn is_compressed(&self) -> bool {
        !self.path.ends_with(".ko")
    }
}

/// The module index of one kernel release.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    dir: PathBuf,
    modules: BTreeMap<String, Module>,
    builtin: BTreeSet<String>,
}

/// The canonical module name of a path such as `kernel/fs/fat/vfat.ko.xz`.
pub fn name_of(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|suffix| base.strip_suffix(suffix))
        .unwrap_or(base);
    stem.replace('-', "_")
}

/// How a requested module is satisfied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Built into the kernel: nothing to load.
    Builtin(String),
    /// A module file to load; dependencies come earlier in the list.
    Load(Module),
}

impl ModuleIndex {
    /// Parses the text of `modules.dep` and `modules.builtin`. `dir` names the module
    /// directory in errors.
    pub fn parse(dir: &Path, dep: &str, builtin: &str) -> Result<Self, KmodError> {
        let mut modules = BTreeMap::new();
        for (i, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                return Err(KmodError::Malformed {
                    path: dir.join("modules.dep"),
                    line: i + 1,
                });
            };
            let path = path.trim();
            if path.is_empty() {
                return Err(KmodError::Malformed {
                    path: dir.join("modules.dep"),
                    line: i + 1,
                });
            }
            let module = Module {
                name: name_of(path),
                path: path.to_owned(),
                deps: deps.split_whitespace().map(name_of).collect(),
            };
            modules.insert(module.name.clone(), module);
        }
        let builtin = builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(name_of)
            .collect();
        Ok(ModuleIndex {
            dir: dir.to_owned(),
            modules,
            builtin,
        })
    }

    /// Reads `modules.dep` and (if present) `modules.builtin` from a module directory such as
    /// `/lib/modules/6.1.0-56-amd64`.
    pub fn read(dir: &Path) -> Result<Self, KmodError> {
        let read = |name: &str, optional: bool| -> Result<String, KmodError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(s),
                Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                Err(source) => Err(KmodError::Read { path, source }),
            }
        };
        Self::parse(
            dir,
            &read("modules.dep", false)?,
            &read("modules.builtin", true)?,
        )
    }

    /// The module directory this index describes.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks a module up by any spelling of its name.
    pub fn get(&self, name: &str) -> Option<&Module> {
        self.modules.get(&name.replace('-', "_"))
    }

    /// Whether a module is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&name.replace('-', "_"))
    }

    /// Resolves the requested modules into load order: every module after its dependencies,
    /// each once. Built-in modules are reported and not loaded.
    pub fn resolve<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Resolved>, KmodError> {
        let mut out = Vec::new();
        let mut done = BTreeSet::new();
        for name in names {
            let name = name.replace('-', "_");
            if self.is_builtin(&name) && !self.modules.contains_key(&name) {
                if done.insert(name.clone()) {
                    out.push(Resolved::Builtin(name));
                }
                continue;
            }
            let mut visiting = BTreeSet::new();
            self.visit(&name, &mut visiting, &mut done, &mut out)?;
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        visiting: &mut BTreeSet<String>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<Resolved>,
    ) -> Result<(), KmodError> {
        if done.contains(name) {
            return Ok(());
        }
        let Some(module) = self.modules.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_owned());
                return Ok(());
            }
            return Err(KmodError::NotFound {
                name: name.to_owned(),
                dir: self.dir.clone(),
            });
        };
        if !visiting.insert(name.to_owned()) {
            return Err(KmodError::Cycle {
                name: name.to_owned(),
            });
        }
        for dep in &module.deps {
            self.visit(dep, visiting, done, out)?;
        }
        visiting.remove(name);
        done.insert(name.to_owned());
        out.push(Resolved::Load(module.clone()));
        Ok(())
    }

    /// `modules.dep` text holding only the given modules (for an image that carries a subset).
    pub fn dep_text_for(&self, modules: &[&Module]) -> String {
        let mut lines: Vec<String> = modules
            .iter()
            .map(|m| {
                let deps: Vec<&str> = m
                    .deps
                    .iter()
                    .filter_map(|d| self.modules.get(d).map(|dm| dm.path.as_str()))
                    .collect();
                if deps.is_empty() {
                    format!("{}:", m.path)
                } else {
                    format!("{}: {}", m.path, deps.join(" "))
                }
            })
            .collect();
        lines.sort();
        lines.dedup();
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/fs/fat/vfat.ko.xz: kernel/fs/fat/fat.ko.xz
kernel/fs/fat/fat.ko.xz:
kernel/drivers/block/virtio-blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/fs/mbcache.ko\n";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(Path::new("/lib/modules/test"), DEP, BUILTIN).expect("parses")
    }

    fn names(r: &[Resolved]) -> Vec<String> {
        r.iter()
            .map(|r| match r {
                Resolved::Builtin(n) => format!("={n}"),
                Resolved::Load(m) => m.name.clone(),
            })
            .collect()
    }

    #[test]
    fn names_of_paths() {
        let cases = [
            ("kernel/fs/fat/vfat.ko", "vfat"),
            ("kernel/fs/fat/vfat.ko.xz", "vfat"),
            ("kernel/drivers/block/virtio-blk.ko.zst", "virtio_blk"),
            ("x.ko.gz", "x"),
        ];
        for (path, want) in cases {
            assert_eq!(name_of(path), want);
        }
    }

    #[test]
    fn resolves_in_dependency_order() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["9p"], &["9pnet", "netfs", "fscache", "9p"]),
            (
                &["9pnet_virtio", "9p"],
                &[
                    "9pnet",
                    "virtio",
                    "virtio_ring",
                    "9pnet_virtio",
                    "netfs",
                    "fscache",
                    "9p",
                ],
            ),
            (&["virtio-blk"], &["virtio", "virtio_ring", "virtio_blk"]),
            (&["ext4", "vfat", "ext4"], &["=ext4", "fat", "vfat"]),
            (&[], &[]),
        ];
        for (req, want) in cases {
            let got = index().resolve(req.iter().copied()).expect("resolves");
            assert_eq!(names(&got), *want, "{req:?}");
        }
        let vfat = index().resolve(["vfat"]).expect("resolves");
        assert!(matches!(&vfat[1], Resolved::Load(m) if m.is_compressed()));
    }

    #[test]
    fn unknown_modules_and_cycles_are_errors() {
        let err = index().resolve(["nope"]).expect_err("unknown");
        assert!(err
            .to_string()
            .contains("\"nope\" not found in /lib/modules/test"));
        let cyclic =
            ModuleIndex::parse(Path::new("/m"), "a.ko: b.ko\nb.ko: a.ko\n", "").expect("parses");
        assert!(matches!(
            cyclic.resolve(["a"]),
            Err(KmodError::Cycle { .. })
        ));
        let bad = ModuleIndex::parse(Path::new("/m"), "a.ko b.ko\n", "");
        assert!(matches!(bad, Err(KmodError::Malformed { line: 1, .. })));
    }

    #[test]
    fn subset_dep_text_keeps_only_given_modules() {
        let idx = index();
        let resolved = idx.resolve(["virtio_blk"]).expect("resolves");
        let mods: Vec<&Module> = resolved
            .iter()
            .filter_map(|r| match r {
                Resolved::Load(m) => Some(m),
                Resolved::Builtin(_) => None,
            })
            .collect();
        let text = idx.dep_text_for(&mods);
        assert_eq!(
            text,
            "kernel/drivers/block/virtio-blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio.ko:\n\
             kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n"
        );
        let again = ModuleIndex::parse(Path::new("/m"), &text, "").expect("parses");
        assert_eq!(
            names(&again.resolve(["virtio_blk"]).expect("ok")),
            ["virtio", "virtio_ring", "virtio_blk"]
        );
    }
}
