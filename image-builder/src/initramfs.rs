//! `bootlace-image initramfs`: a rootfs directory + `bootlace-init` + its config + the kernel
//! modules it needs -> a newc cpio archive (optionally gzip), byte-identical for the same
//! inputs.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use bootlace_contract::config::{InitConfig, ModuleName, CONFIG_PATH};
use bootlace_contract::drivers;
use bootlace_contract::kmod::{KmodError, Module, ModuleIndex, Resolved};

use crate::cpio::{self, Header, Kind};
use crate::tree::{Content, Node, Tree, TreeError};

/// Where the init is installed in the image.
pub const INIT_PATH: &str = "/sbin/bootlace-init";

/// Compression of the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Plain newc.
    None,
    /// gzip (the kernel's default initramfs decompressor).
    #[default]
    Gzip,
}

/// Kernel modules to put into the image.
#[derive(Debug, Clone)]
pub struct Modules {
    /// Directory holding one subdirectory per kernel release (`/lib/modules`).
    pub root: PathBuf,
    /// The kernel release (`6.1.0-56-amd64`).
    pub release: String,
    /// Modules copied in besides the ones the config loads at boot.
    pub extra: Vec<ModuleName>,
}

/// Everything an initramfs is made from.
#[derive(Debug, Clone)]
pub struct Spec {
    /// A root filesystem directory to include (optional: the init alone boots too).
    pub rootfs: Option<PathBuf>,
    /// The `bootlace-init` binary.
    pub init: PathBuf,
    /// The config baked into `/etc/bootlace/init.toml`.
    pub config: InitConfig,
    /// Kernel modules: those in `config.modules` plus `extra`, with dependencies.
    pub modules: Option<Modules>,
    /// Keep the rootfs owners instead of making everything root-owned.
    pub keep_owners: bool,
    /// Modification time of every entry (SOURCE_DATE_EPOCH).
    pub mtime: u32,
    /// Archive compression.
    pub compression: Compression,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Entries in the archive.
    pub entries: usize,
    /// Bytes of the output file.
    pub bytes: u64,
    /// Modules copied, in load order.
    pub modules: Vec<String>,
}

/// Why an initramfs could not be built. Nothing is left at the output path on error.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The init binary is missing or unreadable.
    #[error("init binary {}", path.display())]
    Init {
        /// The path given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The config would be refused at boot.
    #[error("the config to bake")]
    Config(#[source] bootlace_contract::config::Inconsistency),
    /// The rootfs could not be read, or something could not be placed in it.
    #[error("rootfs")]
    Tree(#[source] TreeError),
    /// Module resolution failed.
    #[error("kernel modules")]
    Modules(#[source] KmodError),
    /// A module needed for the config has no file (or modules were requested with no kernel).
    #[error("kernel modules: {0}")]
    ModulesSpec(String),
    /// The kernel has no driver for a configured bootstrap source.
    #[error(
        "the {which} source needs kernel modules that {release} does not have ({missing}): \
         a guest booted on it would wait out the source's timeout; use a kernel with them \
         (the Debian cloud kernel has no 9p) or another source"
    )]
    SourceDrivers {
        /// The source.
        which: bootlace_contract::config::Source,
        /// The kernel release.
        release: String,
        /// The modules it lacks.
        missing: String,
    },
    /// Writing the output failed.
    #[error("write {}", path.display())]
    Output {
        /// The output path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Assembles the tree of the image (without writing anything).
pub fn assemble(spec: &Spec) -> Result<(Tree, Vec<String>), BuildError> {
    spec.config.validate().map_err(BuildError::Config)?;
    let mut tree = Tree::new();
    if let Some(rootfs) = &spec.rootfs {
        tree.add_host_dir(rootfs, spec.keep_owners)
            .map_err(BuildError::Tree)?;
    }
    let put =
        |tree: &mut Tree, path: &str, node: Node| tree.put(path, node).map_err(BuildError::Tree);
    for dir in ["dev", "proc", "sys", "run", "tmp", "etc", "etc/bootlace"] {
        put(
            &mut tree,
            dir,
            Node::dir(if dir == "tmp" { 0o1777 } else { 0o755 }),
        )?;
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    put(
        &mut tree,
        "dev/console",
        Node::root(Content::CharDev(5, 1), 0o600),
    )?;

    let init_meta = std::fs::metadata(&spec.init).map_err(|source| BuildError::Init {
        path: spec.init.clone(),
        source,
    })?;
    if !init_meta.is_file() {
        return Err(BuildError::Init {
            path: spec.init.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    if tree.get("init").is_some() {
        log::warn!("replacing the rootfs's /init with bootlace-init");
    }
    put(
        &mut tree,
        INIT_PATH,
        Node::root(
            Content::HostFile {
                path: spec.init.clone(),
                size: init_meta.len(),
            },
            0o755,
        ),
    )?;
    put(
        &mut tree,
        "init",
        Node::root(Content::Symlink(INIT_PATH.to_owned()), 0o777),
    )?;

    let mut text = String::from("# Written by bootlace-image; see docs/boot.md for the schema.\n");
    text.push_str(&spec.config.to_toml());
    put(
        &mut tree,
        CONFIG_PATH,
        Node::root(Content::Bytes(text.into_bytes()), 0o644),
    )?;

    let modules = add_modules(&mut tree, spec)?;
    Ok((tree, modules))
}

/// The kernel modules an image gets: the files to copy and the index to write.
#[derive(Debug, Clone, Default)]
pub struct ModulePlan {
    /// The kernel release (`None` when no modules are needed).
    pub release: Option<String>,
    /// (path in the image, host file), module files in load order then `modules.builtin`.
    pub files: Vec<(String, PathBuf)>,
    /// `lib/modules/<release>/modules.dep` for exactly the modules copied.
    pub dep: Option<(String, String)>,
    /// Module names copied, in load order.
    pub names: Vec<String>,
}

/// Works out the modules `config` needs (its `modules`, the drivers its bootstrap sources, host
/// link and stage 1 need: [`drivers::implied_by`]) plus `spec.extra`, with their dependency
/// closure. A source whose drivers the kernel does not have is an error (the init would wait
/// out its timeout at boot); an implied filesystem module the kernel lacks is a warning.
pub fn module_plan(config: &InitConfig, spec: Option<&Modules>) -> Result<ModulePlan, BuildError> {
    let mut wanted: Vec<&str> = config
        .modules
        .iter()
        .chain(spec.iter().flat_map(|m| m.extra.iter()))
        .map(ModuleName::as_str)
        .collect();
    // The drivers and filesystems the configured sources, host link and stage 1 may need.
    let implied = drivers::implied_by(config);
    let Some(mspec) = spec else {
        if wanted.is_empty() && implied.is_empty() {
            return Ok(ModulePlan::default());
        }
        return Err(BuildError::ModulesSpec(format!(
            "the config needs modules ({}) but no kernel release was given",
            if wanted.is_empty() {
                "bootstrap drivers".to_owned()
            } else {
                wanted.join(", ")
            }
        )));
    };
    let dir = mspec.root.join(&mspec.release);
    let index = ModuleIndex::read(&dir).map_err(BuildError::Modules)?;
    let has = |m: &str| index.get(m).is_some() || index.is_builtin(m);
    for source in &config.bootstrap.sources {
        let missing: Vec<&str> = drivers::source(*source)
            .iter()
            .copied()
            .filter(|m| !has(m))
            .collect();
        if !missing.is_empty() {
            return Err(BuildError::SourceDrivers {
                which: *source,
                release: mspec.release.clone(),
                missing: missing.join(", "),
            });
        }
    }
    for m in implied {
        if has(m) {
            if !wanted.contains(&m) {
                wanted.push(m);
            }
        } else {
            log::warn!("{m} is not in {}: not copied", dir.display());
        }
    }
    let plan = index.resolve(wanted).map_err(BuildError::Modules)?;
    let mods: Vec<&Module> = plan
        .iter()
        .filter_map(|r| match r {
            Resolved::Load(m) => Some(m),
            Resolved::Builtin(_) => None,
        })
        .collect();
    let base = format!("lib/modules/{}", mspec.release);
    let mut out = ModulePlan {
        release: Some(mspec.release.clone()),
        ..ModulePlan::default()
    };
    for m in &mods {
        out.files
            .push((format!("{base}/{}", m.path), dir.join(&m.path)));
    }
    out.dep = Some((format!("{base}/modules.dep"), index.dep_text_for(&mods)));
    let builtin = dir.join("modules.builtin");
    if builtin.is_file() {
        out.files.push((format!("{base}/modules.builtin"), builtin));
    }
    out.names = mods.iter().map(|m| m.name.clone()).collect();
    Ok(out)
}

fn add_modules(tree: &mut Tree, spec: &Spec) -> Result<Vec<String>, BuildError> {
    let plan = module_plan(&spec.config, spec.modules.as_ref())?;
    for (path, host) in &plan.files {
        let meta = std::fs::metadata(host)
            .map_err(|e| BuildError::ModulesSpec(format!("module file {}: {e}", host.display())))?;
        tree.put(
            path,
            Node::root(
                Content::HostFile {
                    path: host.clone(),
                    size: meta.len(),
                },
                0o644,
            ),
        )
        .map_err(BuildError::Tree)?;
    }
    if let Some((path, text)) = plan.dep {
        tree.put(&path, Node::root(Content::Bytes(text.into_bytes()), 0o644))
            .map_err(BuildError::Tree)?;
    }
    Ok(plan.names)
}

/// Writes the tree as a newc archive.
pub fn write_cpio<W: Write>(tree: &Tree, mtime: u32, out: W) -> io::Result<W> {
    let mut w = cpio::Writer::new(out);
    for (path, node) in tree.iter() {
        let kind = match &node.content {
            Content::Dir => Kind::Dir,
            Content::HostFile { size, .. } => Kind::File { size: *size },
            Content::Bytes(b) => Kind::File {
                size: b.len() as u64,
            },
            Content::Symlink(t) => Kind::Symlink { target: t.clone() },
            Content::CharDev(major, minor) => Kind::CharDev {
                major: *major,
                minor: *minor,
            },
            Content::BlockDev(major, minor) => Kind::BlockDev {
                major: *major,
                minor: *minor,
            },
            Content::Fifo => Kind::Fifo,
        };
        let header = Header {
            name: path.clone(),
            kind,
            perm: node.perm,
            uid: node.uid,
            gid: node.gid,
            mtime,
        };
        match &node.content {
            Content::HostFile { path: host, .. } => {
                let mut f = File::open(host)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", host.display())))?;
                w.entry(&header, Some(&mut f))?;
            }
            Content::Bytes(b) => {
                let mut r: &[u8] = b;
                w.entry(&header, Some(&mut r))?;
            }
            _ => w.entry(&header, None)?,
        }
    }
    w.finish()
}

/// Builds the initramfs at `out`: written to a temporary file beside it, synced, then renamed,
/// so `out` is either the complete new archive or untouched.
pub fn build(spec: &Spec, out: &Path) -> Result<Summary, BuildError> {
    let (tree, modules) = assemble(spec)?;
    let out_err = |source| BuildError::Output {
        path: out.to_owned(),
        source,
    };
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".bootlace-image.")
        .tempfile_in(dir)
        .map_err(out_err)?;
    {
        let buf = BufWriter::new(tmp.as_file());
        match spec.compression {
            Compression::None => {
                write_cpio(&tree, spec.mtime, buf)
                    .and_then(|mut b| b.flush())
                    .map_err(out_err)?;
            }
            Compression::Gzip => {
                let gz = flate2::GzBuilder::new()
                    .mtime(0)
                    .operating_system(3)
                    .write(buf, flate2::Compression::default());
                write_cpio(&tree, spec.mtime, gz)
                    .and_then(|gz| gz.finish())
                    .and_then(|mut b| b.flush())
                    .map_err(out_err)?;
            }
        }
    }
    tmp.as_file().sync_all().map_err(out_err)?;
    let bytes = tmp.as_file().metadata().map_err(out_err)?.len();
    set_mode(tmp.path(), 0o644).map_err(out_err)?;
    tmp.persist(out).map_err(|e| out_err(e.error))?;
    Ok(Summary {
        entries: tree.len(),
        bytes,
        modules,
    })
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// SOURCE_DATE_EPOCH from the environment, or 0.
pub fn source_date_epoch() -> Result<u32, String> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Err(_) => Ok(0),
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("SOURCE_DATE_EPOCH={v:?} is not a timestamp (seconds, u32)")),
    }
}
