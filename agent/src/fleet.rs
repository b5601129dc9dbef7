//! The fleet file: which guest is which, and what each gets (docs/host.md).
//!
//! ```toml
//! port = 1024                          # the port guests dial (sockets are <socket>_<port>)
//!
//! [defaults]                           # for every guest that does not say otherwise
//! bundle = "base/"                     # a directory, tar, tar.gz or tar.zst; relative to this file
//! image = "web@1.0"
//! vars = { REGION = "eu" }
//!
//! [guests.web-1]
//! socket = "/run/vms/web-1/vsock"      # its hybrid-vsock socket: the VM, known by the host
//! hostname = "web-1"                   # written into the bundle's manifest
//! vars = { ROLE = "web" }              # added to the manifest's [env] (these win)
//! command = ["/srv/web", "--port", "80"] # replaces the image's command, supervised
//! init = "bootlace-init-0.2.0"         # a newer bootlace-init, to take over PID 1 at boot
//!
//! [guests.db]
//! cid = 7                              # its AF_VSOCK context id
//! uuid = "6f1c…"                       # and the SMBIOS UUID it must report
//! bundle = "db.tar.gz"
//! ```
//!
//! `--fleet` takes such a file or a directory of them (`*.toml`, one or more guests each; at
//! most one `[defaults]`). A guest is found by its socket, then its CID, then the instance
//! id (SMBIOS UUID) it reports in HELLO; a guest known by socket or CID that also names a
//! `uuid` must report that one. The files, and the bundles they name, are watched: a change
//! applies to the next request, and a file that no longer parses keeps the previous fleet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bootlace_contract::compression::Compression;
use bootlace_contract::manifest::MANIFEST_NAME;

use crate::bundle::{BundleSource, BundleSourceError};
use crate::host::{hybrid_path, Event, Host};
use crate::resolve::{Assignment, Identity, Resolve, Transport};

/// Why a fleet could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A file or directory could not be read.
    #[error("read {}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file is not a valid fleet file.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Two files or entries contradict each other.
    #[error("{0}")]
    Conflict(String),
    /// A guest's bundle could not be read or composed.
    #[error("guest {guest}: bundle {}", path.display())]
    Bundle {
        /// The guest.
        guest: String,
        /// The bundle.
        path: PathBuf,
        /// The cause.
        #[source]
        source: BundleError,
    },
    /// A directory holds no `*.toml`.
    #[error("{}: no *.toml fleet files in it", .0.display())]
    Empty(PathBuf),
}

/// Why a guest's bundle could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading it.
    #[error(transparent)]
    Source(#[from] BundleSourceError),
    /// Adding the hostname and vars to its manifest.
    #[error("adding hostname/vars to its bootlace.toml: {0}")]
    Compose(String),
    /// The newer init to carry could not be read.
    #[error("the init {}", path.display())]
    Init {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Where a composed bundle carries the host's newer init (`init = …` in the fleet).
pub const INIT_ENTRY: &str = "bootlace/init";

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    port: Option<u32>,
    defaults: Option<Entry>,
    #[serde(default)]
    guests: BTreeMap<String, Entry>,
}

#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    socket: Option<PathBuf>,
    cid: Option<u32>,
    uuid: Option<String>,
    bundle: Option<PathBuf>,
    hostname: Option<String>,
    image: Option<String>,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    command: Option<Vec<String>>,
    init: Option<PathBuf>,
}

/// One guest as loaded.
#[derive(Debug, Clone)]
struct Guest {
    name: String,
    socket: Option<PathBuf>,
    cid: Option<u32>,
    uuid: Option<String>,
    assignment: Assignment,
}

/// A loaded fleet: the guests and their indexes.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    guests: Vec<Guest>,
    by_socket: HashMap<PathBuf, usize>,
    by_cid: HashMap<u32, usize>,
    by_uuid: HashMap<String, usize>,
    /// Files read and bundles named, with what they looked like (to notice changes).
    watched: Vec<(PathBuf, Stamp)>,
    source: PathBuf,
}

/// What a file looked like: size and modification time, or for a directory its entries'.
type Stamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn stamp(path: &Path) -> Stamp {
    fn walk(p: &Path, out: &mut Stamp, depth: usize) {
        let Ok(m) = std::fs::symlink_metadata(p) else {
            out.push((p.to_owned(), u64::MAX, None));
            return;
        };
        out.push((p.to_owned(), m.len(), m.modified().ok()));
        if m.is_dir() && depth < 32 {
            if let Ok(rd) = std::fs::read_dir(p) {
                let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                names.sort();
                for n in names {
                    walk(&n, out, depth + 1);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(path, &mut out, 0);
    out
}

impl Loaded {
    /// Reads the fleet at `path` (a file or a directory of `*.toml`), for guests that dial
    /// `default_port` unless the file names another.
    pub fn read(path: &Path, default_port: u32) -> Result<Loaded, FleetError> {
        let files = fleet_files(path)?;
        let mut defaults: Option<(PathBuf, Entry)> = None;
        let mut port = default_port;
        let mut entries: BTreeMap<String, (PathBuf, Entry)> = BTreeMap::new();
        for f in &files {
            let text = std::fs::read_to_string(f).map_err(|source| FleetError::Read {
                path: f.clone(),
                source,
            })?;
            let doc: FileDoc = toml::from_str(&text).map_err(|e| FleetError::Parse {
                path: f.clone(),
                message: e.to_string().trim_end().to_owned(),
            })?;
            if let Some(p) = doc.port {
                port = p;
            }
            if let Some(d) = doc.defaults {
                if let Some((other, _)) = &defaults {
                    return Err(FleetError::Conflict(format!(
                        "[defaults] is in both {} and {}: keep one",
                        other.display(),
                        f.display()
                    )));
                }
                defaults = Some((f.clone(), d));
            }
            for (name, e) in doc.guests {
                if let Some((other, _)) = entries.get(&name) {
                    return Err(FleetError::Conflict(format!(
                        "guest {name:?} is in both {} and {}",
                        other.display(),
                        f.display()
                    )));
                }
                entries.insert(name, (f.clone(), e));
            }
        }
        let mut loaded = Loaded {
            source: path.to_owned(),
            ..Loaded::default()
        };
        for f in &files {
            loaded.watched.push((f.clone(), stamp(f)));
        }
        if path.is_dir() {
            loaded.watched.push((path.to_owned(), stamp_dir_only(path)));
        }
        let mut cache = BundleCache::default();
        for (name, (file, e)) in entries {
            let base = defaults.as_ref().map(|(f, d)| (f.as_path(), d));
            let g = build_guest(
                &name,
                &file,
                &e,
                base,
                port,
                &mut cache,
                &mut loaded.watched,
            )?;
            loaded.index(g)?;
        }
        Ok(loaded)
    }

    fn index(&mut self, g: Guest) -> Result<(), FleetError> {
        let i = self.guests.len();
        let clash = |what: String, other: usize| {
            let other = self.guests.get(other).map_or("?", |o| o.name.as_str());
            FleetError::Conflict(format!(
                "guests {other:?} and {:?} have the same {what}",
                g.name
            ))
        };
        if let Some(s) = &g.socket {
            if let Some(&o) = self.by_socket.get(s) {
                return Err(clash(format!("socket {}", s.display()), o));
            }
        }
        if let Some(c) = g.cid {
            if let Some(&o) = self.by_cid.get(&c) {
                return Err(clash(format!("cid {c}"), o));
            }
        }
        if let Some(u) = &g.uuid {
            if let Some(&o) = self.by_uuid.get(u) {
                return Err(clash(format!("uuid {u}"), o));
            }
        }
        if let Some(s) = &g.socket {
            self.by_socket.insert(s.clone(), i);
        }
        if let Some(c) = g.cid {
            self.by_cid.insert(c, i);
        }
        if let Some(u) = &g.uuid {
            self.by_uuid.insert(u.clone(), i);
        }
        self.guests.push(g);
        Ok(())
    }

    /// The sockets of the guests (the listeners the host should have).
    pub fn sockets(&self) -> Vec<PathBuf> {
        self.by_socket.keys().cloned().collect()
    }

    /// What the fleet gives the guest called `name` (its bundle's digest, for one: what to
    /// hand the VM out of band, `bootlace-agent resolve`).
    pub fn assignment(&self, name: &str) -> Option<&Assignment> {
        self.guests
            .iter()
            .find(|g| g.name == name)
            .map(|g| &g.assignment)
    }

    /// The names of the guests, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.guests.iter().map(|g| g.name.as_str())
    }

    /// Guests in the fleet.
    pub fn len(&self) -> usize {
        self.guests.len()
    }

    /// Whether it has no guests.
    pub fn is_empty(&self) -> bool {
        self.guests.is_empty()
    }

    /// Whether a file it was read from, or a bundle it names, changed since.
    fn changed(&self) -> bool {
        self.watched
            .iter()
            .any(|(p, s)| stamp_of(p, &self.source) != *s)
    }

    fn resolve(&self, who: &Identity<'_>) -> Assignment {
        let by_transport = match who.transport {
            Transport::Unix(p) => self.by_socket.get(p),
            Transport::Vsock { cid } => self.by_cid.get(cid),
            Transport::Memory(_) => None,
        };
        let uuid = who.instance_id.map(str::to_ascii_lowercase);
        let found = by_transport.or_else(|| {
            // By the reported UUID only for a guest the fleet knows by nothing else.
            let i = self.by_uuid.get(uuid.as_deref()?)?;
            let g = self.guests.get(*i)?;
            (g.socket.is_none() && g.cid.is_none()).then_some(i)
        });
        let Some(g) = found.and_then(|i| self.guests.get(*i)) else {
            return Assignment::refused(format!(
                "unknown guest: {}{} is not in the fleet {}",
                who.transport.label(),
                who.instance_id
                    .map(|u| format!(" (INSTANCE_ID {u})"))
                    .unwrap_or_default(),
                self.source.display()
            ));
        };
        if let (Some(want), Some(got)) = (&g.uuid, &uuid) {
            if want != got {
                let mut a = g.assignment.clone();
                a.bundle = None;
                a.reason = Some(format!(
                    "{} reports INSTANCE_ID {got}; the fleet expects {want} for guest {:?}",
                    who.transport.label(),
                    g.name
                ));
                return a;
            }
        }
        g.assignment.clone()
    }
}

/// What `p` looks like as the fleet watches it: the fleet's own directory by its entries
/// (a `*.toml` added or removed), anything else by [`stamp`].
fn stamp_of(p: &Path, source: &Path) -> Stamp {
    if p == source && p.is_dir() {
        stamp_dir_only(p)
    } else {
        stamp(p)
    }
}

fn stamp_dir_only(p: &Path) -> Stamp {
    let mut names: Vec<PathBuf> = std::fs::read_dir(p)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    names.sort();
    names.into_iter().map(|n| (n, 0, None)).collect()
}

/// The fleet files at `path`: itself, or the `*.toml` in it, sorted.
fn fleet_files(path: &Path) -> Result<Vec<PathBuf>, FleetError> {
    let err = |source| FleetError::Read {
        path: path.to_owned(),
        source,
    };
    if !std::fs::metadata(path).map_err(err)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(FleetError::Empty(path.to_owned()));
    }
    Ok(files)
}

/// A composed bundle: its base and what was written into it.
type ComposeKey = (Option<PathBuf>, Customize);

/// Bundles read once per fleet load, shared by the guests that name the same one with the
/// same hostname and vars.
#[derive(Default)]
struct BundleCache {
    plain: HashMap<PathBuf, Arc<BundleSource>>,
    composed: HashMap<ComposeKey, Arc<BundleSource>>,
    /// Bundles already in the watched list: a bundle shared by 10,000 guests is checked once
    /// per check, not 10,000 times.
    watched: HashSet<PathBuf>,
}

/// Adds `path` to the watched files, once per load.
fn watch(path: Option<&PathBuf>, cache: &mut BundleCache, watched: &mut Vec<(PathBuf, Stamp)>) {
    if let Some(p) = path.filter(|p| cache.watched.insert((*p).clone())) {
        watched.push((p.clone(), stamp(p)));
    }
}

fn build_guest(
    name: &str,
    file: &Path,
    e: &Entry,
    defaults: Option<(&Path, &Entry)>,
    port: u32,
    cache: &mut BundleCache,
    watched: &mut Vec<(PathBuf, Stamp)>,
) -> Result<Guest, FleetError> {
    let rel = |base: &Path, p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.parent().unwrap_or(Path::new(".")).join(p)
        }
    };
    let bundle = e
        .bundle
        .as_ref()
        .map(|b| rel(file, b))
        .or_else(|| defaults.and_then(|(f, d)| d.bundle.as_ref().map(|b| rel(f, b))));
    let image = e
        .image
        .clone()
        .or_else(|| defaults.and_then(|(_, d)| d.image.clone()));
    let mut vars = defaults.map(|(_, d)| d.vars.clone()).unwrap_or_default();
    vars.extend(e.vars.clone());
    let init = e
        .init
        .as_ref()
        .map(|i| rel(file, i))
        .or_else(|| defaults.and_then(|(f, d)| d.init.as_ref().map(|i| rel(f, i))));
    watch(init.as_ref(), cache, watched);
    let custom = Customize {
        hostname: e.hostname.clone(),
        vars,
        command: e
            .command
            .clone()
            .or_else(|| defaults.and_then(|(_, d)| d.command.clone())),
        init,
    };
    if custom.command.as_ref().is_some_and(Vec::is_empty) {
        return Err(FleetError::Parse {
            path: file.to_owned(),
            message: format!("guest {name:?}: command is empty"),
        });
    }
    if let Some(uuid) = &e.uuid {
        if uuid.is_empty() {
            return Err(FleetError::Parse {
                path: file.to_owned(),
                message: format!("guest {name:?}: uuid is empty"),
            });
        }
    }
    if e.socket.is_none() && e.cid.is_none() && e.uuid.is_none() {
        return Err(FleetError::Parse {
            path: file.to_owned(),
            message: format!("guest {name:?}: give socket, cid or uuid (how the host knows it)"),
        });
    }
    let made = |source| FleetError::Bundle {
        guest: name.to_owned(),
        path: bundle.clone().unwrap_or_default(),
        source,
    };
    watch(bundle.as_ref(), cache, watched);
    let source = if custom.is_empty() {
        match &bundle {
            Some(b) => Some(match cache.plain.get(b) {
                Some(s) => Arc::clone(s),
                None => {
                    let s = Arc::new(BundleSource::from_path(b).map_err(|e| made(e.into()))?);
                    cache.plain.insert(b.clone(), Arc::clone(&s));
                    s
                }
            }),
            None => None,
        }
    } else {
        let key = (bundle.clone(), custom.clone());
        Some(match cache.composed.get(&key) {
            Some(s) => Arc::clone(s),
            None => {
                let s = Arc::new(compose_with(bundle.as_deref(), &custom).map_err(made)?);
                cache.composed.insert(key, Arc::clone(&s));
                s
            }
        })
    };
    let reason = source
        .is_none()
        .then(|| format!("the fleet gives guest {name:?} no bundle"));
    Ok(Guest {
        name: name.to_owned(),
        socket: e.socket.as_ref().map(|s| hybrid_path(&rel(file, s), port)),
        cid: e.cid,
        uuid: e.uuid.as_ref().map(|u| u.to_ascii_lowercase()),
        assignment: Assignment {
            name: Some(name.to_owned()),
            bundle: source,
            reason,
            image,
        },
    })
}

/// What the host writes into a guest's bundle manifest (`bootlace.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Customize {
    /// Its `hostname`.
    pub hostname: Option<String>,
    /// Added to its `[env]` (these win).
    pub vars: BTreeMap<String, String>,
    /// The application, replacing the image's command (`[handoff] mode = "supervise"`,
    /// `command`), as `docker run --entrypoint` replaces an image's: the guest powers off with
    /// its exit status.
    pub command: Option<Vec<String>>,
    /// A newer bootlace-init (a file on the host) the bundle carries at [`INIT_ENTRY`], named
    /// in the manifest's `[init]` with its sha256: the guest's init hands PID 1 over to it
    /// (docs/boot.md).
    pub init: Option<PathBuf>,
}

impl Customize {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.hostname.is_none()
            && self.vars.is_empty()
            && self.command.is_none()
            && self.init.is_none()
    }
}

/// The bundle at `base` (or an empty one) with `hostname` and `vars` written into its
/// `bootlace.toml` (vars on top of its `[env]`): an uncompressed tar, or gzip when the base
/// was compressed.
pub fn compose(
    base: Option<&Path>,
    hostname: Option<&str>,
    vars: &BTreeMap<String, String>,
) -> Result<BundleSource, BundleError> {
    compose_with(
        base,
        &Customize {
            hostname: hostname.map(str::to_owned),
            vars: vars.clone(),
            command: None,
            init: None,
        },
    )
}

/// The bundle at `base` (or an empty one) with `c` written into its `bootlace.toml` (and its
/// init added): an uncompressed tar, or gzip when the base was compressed.
pub fn compose_with(base: Option<&Path>, c: &Customize) -> Result<BundleSource, BundleError> {
    let compose_err = |m: String| BundleError::Compose(m);
    let init = match &c.init {
        Some(path) => Some(read_init(path)?),
        None => None,
    };
    let (tar_bytes, compression) = match base {
        Some(p) => {
            let b = BundleSource::from_path(p)?;
            (
                decompress(&b.bytes, b.compression).map_err(|e| compose_err(e.to_string()))?,
                b.compression,
            )
        }
        None => (Vec::new(), Compression::None),
    };
    let mut out = tar::Builder::new(Vec::new());
    out.mode(tar::HeaderMode::Deterministic);
    let mut manifest: Option<String> = None;
    if !tar_bytes.is_empty() {
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        for entry in archive.entries().map_err(|e| compose_err(e.to_string()))? {
            let mut entry = entry.map_err(|e| compose_err(e.to_string()))?;
            let path = entry
                .path()
                .map_err(|e| compose_err(e.to_string()))?
                .into_owned();
            if path
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .eq(Path::new(MANIFEST_NAME).components())
            {
                let mut text = String::new();
                entry
                    .read_to_string(&mut text)
                    .map_err(|e| compose_err(format!("{MANIFEST_NAME}: {e}")))?;
                manifest = Some(text);
                continue;
            }
            if init.is_some() && path.starts_with(INIT_ENTRY) {
                return Err(compose_err(format!(
                    "the bundle already has {INIT_ENTRY}, where the fleet's init goes"
                )));
            }
            let header = entry.header().clone();
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(|e| compose_err(e.to_string()))?;
            out.append(&header, data.as_slice())
                .map_err(|e| compose_err(e.to_string()))?;
        }
    }
    let digest = init
        .as_ref()
        .map(|b| bootlace_contract::digest::of_bytes(b));
    let text = with_identity(manifest.as_deref(), c, digest.as_ref())?;
    if let Some(bytes) = &init {
        append_init(&mut out, bytes).map_err(|e| compose_err(e.to_string()))?;
    }
    let mut h = tar::Header::new_gnu();
    h.set_size(text.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    out.append_data(&mut h, MANIFEST_NAME, text.as_bytes())
        .map_err(|e| compose_err(e.to_string()))?;
    let tar = out.into_inner().map_err(|e| compose_err(e.to_string()))?;
    let bytes = if compression == Compression::None {
        tar
    } else {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &tar).map_err(|e| compose_err(e.to_string()))?;
        gz.finish().map_err(|e| compose_err(e.to_string()))?
    };
    Ok(BundleSource::from_bytes(bytes))
}

fn decompress(bytes: &[u8], c: Compression) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    match c {
        Compression::None => out.extend_from_slice(bytes),
        Compression::Gzip => {
            flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out)?;
        }
        Compression::Zstd => {
            ruzstd::decoding::StreamingDecoder::new(bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
                .read_to_end(&mut out)?;
        }
    }
    Ok(out)
}

/// The init file to carry: a regular file of at most the manifest's limit.
fn read_init(path: &Path) -> Result<Vec<u8>, BundleError> {
    let err = |source| BundleError::Init {
        path: path.to_owned(),
        source,
    };
    let limit = bootlace_contract::manifest::MAX_INIT_BYTES;
    let file = std::fs::File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() || meta.len() > limit {
        return Err(err(io::Error::other(format!(
            "not a regular file of at most {limit} bytes"
        ))));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(err)?;
    if bytes.len() as u64 > limit {
        return Err(err(io::Error::other(format!("over {limit} bytes"))));
    }
    Ok(bytes)
}

/// The init's directory and file entries (0755, root, mtime 0).
fn append_init(out: &mut tar::Builder<Vec<u8>>, bytes: &[u8]) -> io::Result<()> {
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_size(0);
    dir.set_mode(0o755);
    dir.set_mtime(0);
    dir.set_uid(0);
    dir.set_gid(0);
    let parent = INIT_ENTRY.rsplit_once('/').map_or("", |(d, _)| d);
    out.append_data(&mut dir, format!("{parent}/"), io::empty())?;
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    out.append_data(&mut h, INIT_ENTRY, bytes)
}

/// `manifest` (or a new one) with `hostname`, `vars`, `command` and the carried init's
/// `[init]` in it, checked by the guest's own manifest parser.
fn with_identity(
    manifest: Option<&str>,
    c: &Customize,
    init: Option<&bootlace_contract::digest::Sha256Digest>,
) -> Result<String, BundleError> {
    let mut doc: toml::Table = match manifest {
        Some(text) => toml::from_str(text).map_err(|e| {
            BundleError::Compose(format!("{MANIFEST_NAME}: {}", e.to_string().trim_end()))
        })?,
        None => {
            let mut t = toml::Table::new();
            t.insert("version".to_owned(), toml::Value::Integer(1));
            t
        }
    };
    if let Some(h) = &c.hostname {
        doc.insert("hostname".to_owned(), toml::Value::String(h.clone()));
    }
    if let Some(argv) = &c.command {
        let handoff = doc
            .entry("handoff".to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(handoff) = handoff.as_table_mut() else {
            return Err(BundleError::Compose(format!(
                "{MANIFEST_NAME}: handoff is not a table"
            )));
        };
        handoff.insert(
            "mode".to_owned(),
            toml::Value::String("supervise".to_owned()),
        );
        handoff.insert(
            "command".to_owned(),
            toml::Value::Array(argv.iter().cloned().map(toml::Value::String).collect()),
        );
    }
    let vars = &c.vars;
    if !vars.is_empty() {
        let env = doc
            .entry("env".to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(env) = env.as_table_mut() else {
            return Err(BundleError::Compose(
                "bootlace.toml: env is not a table".to_owned(),
            ));
        };
        for (k, v) in vars {
            env.insert(k.clone(), toml::Value::String(v.clone()));
        }
    }
    if let Some(digest) = init {
        let mut t = toml::Table::new();
        t.insert(
            "path".to_owned(),
            toml::Value::String(INIT_ENTRY.to_owned()),
        );
        t.insert("sha256".to_owned(), toml::Value::String(digest.to_string()));
        doc.insert("init".to_owned(), toml::Value::Table(t));
    }
    let text = toml::to_string(&doc).map_err(|e| BundleError::Compose(e.to_string()))?;
    bootlace_contract::manifest::Manifest::parse(&text, Path::new(MANIFEST_NAME))
        .map_err(|e| BundleError::Compose(bootlace_contract::chain(&e)))?;
    Ok(text)
}

/// The host agent's resolver: a fleet file, reloaded when it or a bundle it names changes.
#[derive(Debug)]
pub struct Fleet {
    current: RwLock<Arc<Loaded>>,
    path: PathBuf,
    port: u32,
}

impl Fleet {
    /// Reads the fleet at `path` (see the module documentation).
    pub fn open(path: &Path, port: u32) -> Result<Arc<Fleet>, FleetError> {
        let loaded = Loaded::read(path, port)?;
        Ok(Arc::new(Fleet {
            current: RwLock::new(Arc::new(loaded)),
            path: path.to_owned(),
            port,
        }))
    }

    /// The fleet as loaded now.
    pub fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads the fleet again if a file or bundle changed: `Ok(Some(n))` with the guest count
    /// when it did, `Ok(None)` when nothing changed, the error (the previous fleet stays)
    /// when the new one does not load.
    pub fn reload_if_changed(&self) -> Result<Option<usize>, FleetError> {
        if !self.current().changed() {
            return Ok(None);
        }
        let loaded = Loaded::read(&self.path, self.port);
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        match loaded {
            Ok(l) => {
                let n = l.len();
                *cur = Arc::new(l);
                Ok(Some(n))
            }
            Err(e) => {
                // Remember what was seen, so that the same broken file is reported once.
                let mut stale = Loaded::clone(&cur);
                let mut paths: Vec<PathBuf> =
                    stale.watched.iter().map(|(p, _)| p.clone()).collect();
                for f in fleet_files(&self.path).unwrap_or_default() {
                    if !paths.contains(&f) {
                        paths.push(f);
                    }
                }
                stale.watched = paths
                    .into_iter()
                    .map(|p| {
                        let s = stamp_of(&p, &stale.source);
                        (p, s)
                    })
                    .collect();
                *cur = Arc::new(stale);
                Err(e)
            }
        }
    }

    /// Serves the fleet on `host`: listens on every guest's socket now, and on a thread checks
    /// every `every` for changes, applying them (listeners added and removed) and reporting
    /// each reload, or why it was refused, as a notice.
    pub fn watch(self: &Arc<Self>, host: &Arc<Host>, every: Duration) -> io::Result<()> {
        sync_listeners(host, &self.current());
        let fleet = Arc::clone(self);
        let host = Arc::clone(host);
        std::thread::Builder::new()
            .name("bootlace-agent-fleet".to_owned())
            .spawn(move || loop {
                std::thread::sleep(every);
                let what = fleet.path.display().to_string();
                match fleet.reload_if_changed() {
                    // A socket that could not be bound is tried again.
                    Ok(None) => sync_listeners(&host, &fleet.current()),
                    Ok(Some(n)) => {
                        sync_listeners(&host, &fleet.current());
                        host.emit(
                            None,
                            &what,
                            Event::Notice(format!("fleet reloaded: {n} guests")),
                        );
                    }
                    Err(e) => host.emit(
                        None,
                        &what,
                        Event::Notice(format!(
                            "fleet not reloaded, the previous one stays: {}",
                            bootlace_contract::chain(&e)
                        )),
                    ),
                }
            })?;
        Ok(())
    }
}

/// Makes the host listen on exactly the fleet's sockets (besides the ones it was given
/// itself, which are not the fleet's to remove).
fn sync_listeners(host: &Arc<Host>, fleet: &Loaded) {
    // Sets, not lists: this runs every check, and with 10,000 guests a `Vec::contains` per
    // socket was 10^8 path comparisons each time (most of a core, all the time).
    let want: HashSet<PathBuf> = fleet.sockets().into_iter().collect();
    let mut managed = host.fleet_sockets.lock().unwrap_or_else(|p| p.into_inner());
    for gone in managed.iter().filter(|p| !want.contains(*p)) {
        crate::server::unlisten(host, gone);
    }
    managed.retain(|p| want.contains(p));
    let have: HashSet<PathBuf> = managed.iter().cloned().collect();
    for s in want {
        if have.contains(&s) {
            continue;
        }
        match host.serve_unix(&s) {
            Ok(()) => {
                managed.push(s);
            }
            Err(e) => {
                let about = s.display().to_string();
                host.server.report(
                    host,
                    &about,
                    &format!("listen {about}"),
                    format!("cannot listen on {about} (tried again every check): {e}"),
                );
            }
        }
    }
}

impl Resolve for Fleet {
    fn resolve(&self, who: &Identity<'_>) -> Assignment {
        self.current().resolve(who)
    }
}
