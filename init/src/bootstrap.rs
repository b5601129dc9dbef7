//! The bootstrap filesystem's toolbox: find it (a disk by label, a 9p share by tag, the host's
//! bundle over vsock), mount it read-only at `/.bootstrap` (a vsock bundle is fetched, checked
//! and unpacked into a tmpfs there), read and apply its manifest, and unmount and remove
//! `/.bootstrap` again. The order of these steps, what is reported and what is cleaned up on a
//! failure are decided in [`crate::boot`].

use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bootlace_agent::client::{Client, ClientError};
use bootlace_contract::compression::{Compression, UnknownCompression};
use bootlace_contract::config::{Bootstrap, InitConfig, Source};
use bootlace_contract::drivers;
use bootlace_contract::manifest::{Manifest, ManifestError, MANIFEST_NAME};
use bootlace_contract::trust::{OutOfBand, Policy, TrustError, Trusted};

use crate::apply::{self, Applied, ApplyError};
use crate::blkprobe::FsType;
use crate::devices::{self, Want};
use crate::extract::{self, ExtractError, Limits};
use crate::memory::MemInfo;
use crate::modload::ModuleLoader;
use crate::mounts;
use crate::oob::{self, OobError};
use crate::sys::root::{Root, RootError};
use crate::sys::{self, Flags};

/// Where the bootstrap filesystem is mounted while its manifest runs.
pub const BOOTSTRAP_DIR: &str = "/.bootstrap";

/// Why the bootstrap failed. Messages name the step, device and path.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// No source had the bootstrap filesystem.
    #[error("not found; probed: {probed}")]
    NotFound {
        /// What each source saw.
        probed: String,
    },
    /// Mounting it failed.
    #[error("mount {what} on {BOOTSTRAP_DIR}")]
    Mount {
        /// The device or share.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The vsock source was found without a host connection to fetch from.
    #[error("the host is not connected: no bundle to fetch")]
    NoHost,
    /// The vsock bundle is not trusted (see `bootlace_contract::trust`); nothing of it was
    /// stored.
    #[error(transparent)]
    Untrusted(TrustError),
    /// The out-of-band digest (SMBIOS type 11, fw_cfg) is malformed or ambiguous.
    #[error("out-of-band bundle digest")]
    OutOfBand(#[source] OobError),
    /// The unnamed file that receives the bundle could not be made or read.
    #[error("spool the bundle on {BOOTSTRAP_DIR}")]
    Spool(#[source] io::Error),
    /// The guest's memory could not be read.
    #[error("read /proc/meminfo")]
    Memory(#[source] io::Error),
    /// The bundle, or what it unpacks to, does not fit in what the guest's memory holds.
    #[error("{what} than {limit}; nothing of it is kept")]
    NoRoom {
        /// What did not fit.
        what: String,
        /// The limit and the memory it came from.
        limit: Limit,
        /// The unpack error that showed it, if any.
        #[source]
        source: Option<Box<ExtractError>>,
    },
    /// Fetching the bundle from the host failed.
    #[error("fetch from the host")]
    Fetch(#[source] ClientError),
    /// The bundle's digest is not the one it is trusted by.
    #[error(
        "bundle digest mismatch: received sha256:{got}, trusted {trusted}; nothing was extracted"
    )]
    Digest {
        /// Computed over the bytes as received.
        got: String,
        /// What it was trusted by.
        trusted: Trusted,
    },
    /// The host announced a compression the init does not read.
    #[error("bundle from the host")]
    Compression(#[source] UnknownCompression),
    /// The tmpfs that holds an unpacked bundle could not be set up.
    #[error("tmpfs on {BOOTSTRAP_DIR}: {step}")]
    Tmpfs {
        /// What failed: mount, open, read-only remount.
        step: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Unpacking the bundle failed (the tmpfs holding it is discarded).
    #[error("unpack the bundle into {BOOTSTRAP_DIR}")]
    Extract(#[source] ExtractError),
    /// The manifest could not be opened.
    #[error("manifest: open {}", path.display())]
    OpenManifest {
        /// The manifest.
        path: PathBuf,
        /// The cause.
        #[source]
        source: RootError,
    },
    /// The manifest is invalid.
    #[error("manifest")]
    Manifest(#[source] ManifestError),
    /// Applying the manifest failed.
    #[error("manifest")]
    Apply(#[source] ApplyError),
    /// Unmounting or removing `/.bootstrap` failed (nothing was deleted).
    #[error("cleanup of {BOOTSTRAP_DIR}: {what}")]
    Cleanup {
        /// What failed.
        what: String,
        /// The cause.
        #[source]
        source: Option<io::Error>,
    },
}

impl BootstrapError {
    /// Whether this is a missing or invalid manifest (reported as a configuration error).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            BootstrapError::Manifest(_) | BootstrapError::OpenManifest { .. }
        )
    }
}

/// A bootstrap filesystem that was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A block device.
    Disk {
        /// `/dev/vdb`.
        dev: PathBuf,
        /// Its filesystem.
        fstype: FsType,
    },
    /// A 9p share.
    NineP {
        /// Its mount tag.
        tag: String,
    },
    /// A bundle the host serves over vsock.
    Vsock,
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Disk { dev, fstype } => write!(f, "{} ({})", dev.display(), fstype.as_str()),
            Found::NineP { tag } => write!(f, "9p share {tag:?}"),
            Found::Vsock => f.write_str("the host's bundle over vsock"),
        }
    }
}

/// Looks for every configured source at once, under one deadline of `wait_ms`: the first that
/// appears wins, and the configured order decides only between sources present at the same
/// look. The drivers of every source are loaded first. The vsock source is present when a host
/// is connected. `Ok(None)`: an optional bootstrap that no source has.
pub fn find(
    cfg: &Bootstrap,
    loader: &mut ModuleLoader,
    host_connected: bool,
) -> Result<Option<Found>, BootstrapError> {
    for &source in &cfg.sources {
        if source == Source::Vsock {
            continue;
        }
        let loaded = loader.load_best_effort(drivers::source(source));
        if !loaded.is_empty() {
            log::debug!("{} source: loaded {}", source.as_str(), loaded.join(" "));
        }
    }
    let wait = Duration::from_millis(cfg.wait_ms);
    let label = cfg.label.as_str();
    let tag = cfg.tag.as_str();
    let look = |source: Source| match source {
        Source::Vsock if host_connected => Ok(Found::Vsock),
        Source::Vsock => Err("no host connected".to_owned()),
        Source::Disk => devices::find_block(Want::Label(label))
            .map(|b| Found::Disk {
                dev: b.dev,
                fstype: b.fstype,
            })
            .map_err(|seen| {
                format!(
                    "waited {} ms for label {label:?}; saw {seen}",
                    wait.as_millis()
                )
            }),
        Source::NineP => devices::find_share(tag)
            .map(|()| Found::NineP {
                tag: tag.to_owned(),
            })
            .map_err(|seen| format!("waited {} ms for tag {tag:?}; saw {seen}", wait.as_millis())),
    };
    let seen = match first_present(&cfg.sources, wait, devices::POLL, look) {
        Ok((found, after)) => {
            let names: Vec<&str> = cfg.sources.iter().map(|s| s.as_str()).collect();
            log::info!(
                "bootstrap: looked at {} for {} ms",
                names.join(", "),
                after.as_millis()
            );
            return Ok(Some(found));
        }
        Err(seen) => seen,
    };
    let probed = if seen.is_empty() {
        "no sources configured".to_owned()
    } else {
        seen.iter()
            .map(|(source, seen)| format!("{} ({seen})", source.as_str()))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if cfg.required {
        Err(BootstrapError::NotFound { probed })
    } else {
        log::warn!("bootstrap not found (optional): probed {probed}");
        Ok(None)
    }
}

/// Looks at each of `sources`, in order, every `poll` until one is present or `wait` has
/// passed: the first present at a look, and how long it took; else what each source showed at
/// the last look. Every source is looked at once at least, even with no wait.
pub fn first_present<T>(
    sources: &[Source],
    wait: Duration,
    poll: Duration,
    mut look: impl FnMut(Source) -> Result<T, String>,
) -> Result<(T, Duration), Vec<(Source, String)>> {
    let started = std::time::Instant::now();
    loop {
        let mut seen = Vec::with_capacity(sources.len());
        for &source in sources {
            match look(source) {
                Ok(found) => return Ok((found, started.elapsed())),
                Err(s) => seen.push((source, s)),
            }
        }
        // Nothing to wait for when no source can appear later (vsock is known at once).
        let can_appear = sources.iter().any(|&s| s != Source::Vsock);
        if !can_appear || started.elapsed() >= wait {
            return Err(seen);
        }
        std::thread::sleep(poll.min(wait.saturating_sub(started.elapsed())));
    }
}

/// Mounts what was found read-only (nosuid, nodev) on `/.bootstrap`; a vsock bundle is fetched
/// from the host through `client` and unpacked into a tmpfs there.
pub fn mount(
    found: &Found,
    config: &InitConfig,
    loader: &mut ModuleLoader,
    client: Option<&mut Client>,
) -> Result<(), BootstrapError> {
    let dir = Path::new(BOOTSTRAP_DIR);
    let err = |source| BootstrapError::Mount {
        what: found.to_string(),
        source,
    };
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    match std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)) {
        Ok(()) => {}
        // A read-only root has the mount point baked in; what is mounted on it decides.
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) => {}
        Err(e) => return Err(err(e)),
    }
    let flags = Flags {
        nosuid: true,
        nodev: true,
        noexec: false,
        rdonly: true,
    };
    match found {
        Found::Disk { dev, fstype } => {
            loader.load_best_effort(drivers::filesystem(*fstype));
            let dev = dev.to_string_lossy();
            sys::mount(&dev, dir, fstype.as_str(), flags, c"").map_err(err)
        }
        Found::NineP { tag } => {
            sys::mount(tag, dir, "9p", flags, mounts::NINEP_OPTIONS).map_err(err)
        }
        Found::Vsock => fetch_and_unpack(config, loader, client.ok_or(BootstrapError::NoHost)?),
    }
}

/// Fetches the host's bundle and unpacks it into a tmpfs on `/.bootstrap`, made read-only
/// afterwards. The tmpfs is sized to what the guest can hold ([`MemInfo::budget`], at most
/// `host.max_bundle_bytes` and a MiB) and holds both the bundle as received (an unnamed file)
/// and what it unpacks to, so together they can never exceed it; a bundle whose announced size
/// does not fit is refused before a byte is stored. Whether the bundle is trusted (a pinned or
/// out-of-band digest, a signature by a trusted key, trust in the host: [`trust_policy`]) is
/// decided on the host's header, before a byte is stored; its sha256 is checked against the
/// digest it is trusted by before anything is unpacked; the received bytes are freed as the
/// unpack consumes them. On any error the caller's cleanup unmounts the tmpfs: nothing of a bad
/// bundle stays.
fn fetch_and_unpack(
    config: &InitConfig,
    loader: &mut ModuleLoader,
    client: &mut Client,
) -> Result<(), BootstrapError> {
    let out_of_band = out_of_band(config, loader)?;
    let policy = trust_policy(config, out_of_band.as_ref());
    if policy.refuses_all() {
        return Err(BootstrapError::Untrusted(TrustError::NoTrust));
    }
    let mem = MemInfo::read().map_err(BootstrapError::Memory)?;
    let room = Room::new(config.host.max_bundle_bytes, mem);
    log::info!(
        "bootstrap: room for {} MiB of bundle and files ({mem})",
        room.bytes >> 20
    );
    let dir = Path::new(BOOTSTRAP_DIR);
    let tmpfs = |step| move |source| BootstrapError::Tmpfs { step, source };
    let opts = std::ffi::CString::new(format!("mode=0700,size={}", room.tmpfs_size()))
        .map_err(|e| tmpfs("options")(io::Error::other(e)))?;
    let flags = Flags {
        nosuid: true,
        nodev: true,
        noexec: false,
        rdonly: false,
    };
    sys::mount("tmpfs", dir, "tmpfs", flags, &opts).map_err(tmpfs("mount"))?;
    let file = sys::anonymous_file(dir).map_err(BootstrapError::Spool)?;
    let mut spool = Spool::new(file);
    let got = client
        .fetch_trusted_bundle(spool.file_mut(), room.bytes, &policy)
        .map_err(|e| room.refusal(e))?;
    let _ = MemInfo::read();
    log_fetched(&got);
    // The client checked the bytes against the announced digest, and the trust decision the
    // announced digest against the pinned or out-of-band one; checked once more here, where
    // the bytes are about to be unpacked.
    match got.trusted {
        Some(t) if t.digest().matches_hex(&got.sha256) => {
            log::info!("bootstrap: the bundle is trusted by {t}");
        }
        trusted => {
            return Err(BootstrapError::Digest {
                got: got.sha256,
                trusted: trusted.ok_or(BootstrapError::Untrusted(TrustError::NoTrust))?,
            })
        }
    }
    let compression: Compression = got
        .header
        .compression
        .parse()
        .map_err(BootstrapError::Compression)?;
    spool.rewind().map_err(BootstrapError::Spool)?;
    let root = Root::open(dir).map_err(tmpfs("open"))?;
    let limits = Limits {
        max_bytes: room.bytes,
        ..Limits::default()
    };
    let summary = extract::extract(&mut spool, got.header.size, compression, &root, &limits)
        .map_err(|e| room.unpack_refusal(e))?;
    let _ = MemInfo::read();
    drop(spool);
    sys::remount_read_only(dir).map_err(tmpfs("read-only remount"))?;
    log::info!(
        "bootstrap: unpacked {} entries ({} bytes) into a tmpfs on {BOOTSTRAP_DIR}; \
         {} setuid, setgid or sticky bits stripped",
        summary.entries,
        summary.bytes,
        summary.stripped_modes
    );
    Ok(())
}

/// What trusts a vsock bundle in this boot: the configuration's pinned digest and keys, its
/// `trust_host`, and the out-of-band digest read at boot.
pub fn trust_policy<'a>(config: &'a InitConfig, out_of_band: Option<&'a OutOfBand>) -> Policy<'a> {
    Policy {
        pinned: config.host.digest.as_ref(),
        out_of_band,
        keys: &config.host.trust_keys,
        trust_host: config.host.trust_host,
    }
}

/// The digest the VMM gave this VM out of band, read only when nothing is pinned (a pinned
/// digest alone decides). The fw_cfg module is loaded first, best effort: a VMM without
/// fw_cfg, or a kernel without the module, leaves SMBIOS.
fn out_of_band(
    config: &InitConfig,
    loader: &mut ModuleLoader,
) -> Result<Option<OutOfBand>, BootstrapError> {
    if config.host.digest.is_some() {
        return Ok(None);
    }
    let loaded = loader.load_best_effort(drivers::OUT_OF_BAND);
    if !loaded.is_empty() {
        log::debug!("out-of-band digest: loaded {}", loaded.join(" "));
    }
    let found = oob::read(Path::new(oob::DMI_ENTRIES), Path::new(oob::FW_CFG_BY_NAME))
        .map_err(BootstrapError::OutOfBand)?;
    match &found {
        Some(o) => log::info!(
            "bootstrap: out-of-band bundle digest {} ({})",
            o.digest,
            o.channel
        ),
        None => log::debug!("bootstrap: no out-of-band bundle digest"),
    }
    Ok(found)
}

fn log_fetched(got: &bootlace_agent::client::Received) {
    // MB/s with one decimal, in integers (no float formatting in PID 1).
    let micros = u64::try_from(got.elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    let tenths = got.header.size.saturating_mul(10) / micros;
    log::info!(
        "bootstrap: fetched {} bytes ({}) from the host in {} ms ({}.{} MB/s)",
        got.header.size,
        got.header.compression,
        got.elapsed.as_millis(),
        tenths / 10,
        tenths % 10
    );
}

/// What a vsock bundle may take of the guest: the smaller of `host.max_bundle_bytes` and what
/// the guest's memory holds.
#[derive(Debug, Clone, Copy)]
struct Room {
    /// The most bytes the bundle, and the files it unpacks to, may have.
    bytes: u64,
    /// The configured cap.
    configured: u64,
    /// The memory it was derived from.
    mem: MemInfo,
}

impl Room {
    fn new(configured: u64, mem: MemInfo) -> Room {
        Room {
            bytes: configured.min(mem.budget()),
            configured,
            mem,
        }
    }

    /// The tmpfs that holds the bundle and its files: the room, plus a MiB for the directories
    /// and the last partial pages (and never less than a MiB).
    fn tmpfs_size(&self) -> u64 {
        self.bytes.saturating_add(1 << 20)
    }

    /// Whether the guest's memory, not the configured cap, is the limit.
    fn memory_bound(&self) -> bool {
        self.bytes < self.configured
    }

    fn limit(&self) -> Limit {
        Limit {
            bytes: self.bytes,
            configured: self.configured,
            mem: self.mem,
        }
    }

    /// A fetch error, naming the guest's memory when the bundle is too large for it.
    fn refusal(&self, e: ClientError) -> BootstrapError {
        match e {
            ClientError::BundleTooLarge { size, .. } if self.memory_bound() => {
                BootstrapError::NoRoom {
                    what: format!("the host announces a bundle of {size} bytes: more"),
                    limit: self.limit(),
                    source: None,
                }
            }
            ClientError::Untrusted(e) => BootstrapError::Untrusted(e),
            other => BootstrapError::Fetch(other),
        }
    }

    /// An unpack error, naming the guest's memory when the files outgrew it.
    fn unpack_refusal(&self, e: ExtractError) -> BootstrapError {
        let full = matches!(&e, ExtractError::TooManyBytes { .. })
            || std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<RootError>())
                .is_some_and(RootError::is_no_space);
        if full && self.memory_bound() {
            BootstrapError::NoRoom {
                what: "the bundle unpacks to more".to_owned(),
                limit: self.limit(),
                source: Some(Box::new(e)),
            }
        } else {
            BootstrapError::Extract(e)
        }
    }
}

/// The limit a bundle hit, for the message.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// The bytes allowed.
    pub bytes: u64,
    /// `host.max_bundle_bytes`.
    pub configured: u64,
    /// The guest's memory when the fetch began.
    pub mem: MemInfo,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} bytes this guest holds for a bundle and its files ({}; \
             host.max_bundle_bytes {})",
            self.bytes, self.mem, self.configured
        )
    }
}

/// The bundle as received, in an unnamed file on the bootstrap's tmpfs. Read back for the
/// unpack, it gives the memory of what was read back to the guest as it goes (hole punching),
/// so a bundle and its unpacked files are never both held whole.
struct Spool {
    file: std::fs::File,
    /// Bytes read back so far.
    pos: u64,
    /// Bytes already given back (a multiple of the page size).
    freed: u64,
}

impl Spool {
    /// How much is read back before it is given back.
    const STEP: u64 = 1 << 20;

    fn new(file: std::fs::File) -> Spool {
        Spool {
            file,
            pos: 0,
            freed: 0,
        }
    }

    fn file_mut(&mut self) -> &mut std::fs::File {
        &mut self.file
    }

    fn rewind(&mut self) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        self.pos = 0;
        self.freed = 0;
        Ok(())
    }
}

impl io::Read for Spool {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.pos = self.pos.saturating_add(n as u64);
        let upto = self.pos & !4095;
        if upto >= self.freed.saturating_add(Spool::STEP) {
            // Best effort: a filesystem that cannot punch holes keeps the bytes until the end.
            if sys::punch_hole(&self.file, self.freed, upto - self.freed).is_ok() {
                self.freed = upto;
            }
        }
        Ok(n)
    }
}

/// The mount points at or under `/.bootstrap` in `/proc/self/mountinfo`.
fn bootstrap_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == BOOTSTRAP_DIR || p.starts_with("/.bootstrap/"))
        .map(str::to_owned)
        .collect()
}

/// What the cleanup left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleaned {
    /// `/.bootstrap` is unmounted and gone.
    Removed,
    /// `/.bootstrap` is unmounted; its empty mount point stays on a read-only root.
    MountPointStays,
}

/// Unmounts `/.bootstrap` (innermost first), checks mountinfo has nothing left under it, and
/// removes the then empty directory. A mount that stays busy is reported and nothing is
/// deleted: never a recursive delete over a filesystem that might still be mounted.
pub fn cleanup() -> Result<Cleaned, BootstrapError> {
    unmount_all()?;
    let left = bootstrap_mounts();
    if !left.is_empty() {
        return Err(BootstrapError::Cleanup {
            what: format!("still mounted: {}", left.join(", ")),
            source: None,
        });
    }
    match std::fs::remove_dir(BOOTSTRAP_DIR) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // A read-only root keeps its (now empty, unmounted) mount point: the image has it.
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) => {
            return Ok(Cleaned::MountPointStays)
        }
        Err(e) => {
            return Err(BootstrapError::Cleanup {
                what: "remove the directory".to_owned(),
                source: Some(e),
            })
        }
    }
    if Path::new(BOOTSTRAP_DIR).exists() {
        return Err(BootstrapError::Cleanup {
            what: "the directory is still there".to_owned(),
            source: None,
        });
    }
    Ok(Cleaned::Removed)
}

/// Unmounts everything at or under `/.bootstrap`, innermost first; a busy mount is retried for
/// about a second.
fn unmount_all() -> Result<(), BootstrapError> {
    for attempt in 0..20 {
        let mut mounts = bootstrap_mounts();
        if mounts.is_empty() {
            break;
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in &mounts {
            match sys::unmount(Path::new(m)) {
                Ok(()) => {}
                Err(e)
                    if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
                        && attempt < 19 =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(BootstrapError::Cleanup {
                        what: format!("unmount {m}"),
                        source: Some(e),
                    })
                }
            }
        }
    }
    Ok(())
}

/// Reads the manifest of the bundle mounted on `/.bootstrap` and applies it to `/`.
pub fn read_and_apply(
    config: &InitConfig,
    loader: &mut ModuleLoader,
) -> Result<(InitConfig, Applied), BootstrapError> {
    let bundle = Root::open(Path::new(BOOTSTRAP_DIR)).map_err(|source| {
        BootstrapError::Manifest(ManifestError::Read {
            path: PathBuf::from(BOOTSTRAP_DIR),
            source,
        })
    })?;
    let root = Root::open(Path::new("/")).map_err(|source| {
        BootstrapError::Apply(ApplyError::Root {
            step: "open root",
            source: RootError::Io {
                path: "/".to_owned(),
                op: "open",
                source,
            },
        })
    })?;
    apply_bundle(&bundle, Path::new(BOOTSTRAP_DIR), &root, config, loader)
}

/// Reads the manifest of a mounted bundle (`bundle`, shown as `shown` in messages), validates
/// it completely, then applies it to `root`. Nothing is changed when the manifest is refused.
/// Returns the config for the hand-off, with the manifest's environment and hand-off merged.
pub fn apply_bundle(
    bundle: &Root,
    shown: &Path,
    root: &Root,
    config: &InitConfig,
    loader: &mut ModuleLoader,
) -> Result<(InitConfig, Applied), BootstrapError> {
    let manifest_path = shown.join(MANIFEST_NAME);
    let file = bundle
        .open_file(MANIFEST_NAME)
        .map_err(|source| BootstrapError::OpenManifest {
            path: manifest_path.clone(),
            source,
        })?;
    let manifest = Manifest::read_from(file, &manifest_path).map_err(BootstrapError::Manifest)?;
    let mut cfg = config.clone();
    apply::merge_handoff(&mut cfg, &manifest);
    let applied =
        apply::apply(&manifest, root, bundle, loader, &cfg).map_err(BootstrapError::Apply)?;
    Ok((cfg, applied))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Duration = Duration::from_millis(1);

    /// A source that appears at the `n`th look (`None`: never).
    fn appearing(at: [Option<u32>; 3]) -> impl FnMut(Source) -> Result<Source, String> {
        let mut looks = [0u32; 3];
        move |s| {
            let i = match s {
                Source::Disk => 0,
                Source::NineP => 1,
                Source::Vsock => 2,
            };
            looks[i] += 1;
            match at[i] {
                Some(n) if looks[i] >= n => Ok(s),
                _ => Err(format!("{} looks", looks[i])),
            }
        }
    }

    #[test]
    fn the_first_source_to_appear_wins_without_waiting_out_the_others() {
        let order = [Source::Disk, Source::NineP];
        // The share is there from the start; the disk never comes: no wait for the disk.
        let (found, after) = first_present(
            &order,
            Duration::from_secs(5),
            POLL,
            appearing([None, Some(1), None]),
        )
        .expect("found");
        assert_eq!(found, Source::NineP);
        assert!(after < Duration::from_secs(1), "{after:?}");
        // The disk appears at the third look, the share at the fifth: the disk.
        let (found, _) = first_present(
            &order,
            Duration::from_secs(5),
            POLL,
            appearing([Some(3), Some(5), None]),
        )
        .expect("found");
        assert_eq!(found, Source::Disk);
    }

    #[test]
    fn the_configured_order_decides_between_sources_present_at_once() {
        let both = appearing([Some(2), Some(2), None]);
        let (found, _) = first_present(
            &[Source::NineP, Source::Disk],
            Duration::from_secs(5),
            POLL,
            both,
        )
        .expect("found");
        assert_eq!(found, Source::NineP);
        let both = appearing([Some(1), Some(1), Some(1)]);
        let (found, _) = first_present(
            &[Source::Vsock, Source::Disk, Source::NineP],
            Duration::from_secs(5),
            POLL,
            both,
        )
        .expect("found");
        assert_eq!(found, Source::Vsock);
    }

    #[test]
    fn nothing_found_says_what_each_source_showed_after_one_deadline() {
        let started = std::time::Instant::now();
        let seen = first_present(
            &[Source::Disk, Source::NineP, Source::Vsock],
            Duration::from_millis(50),
            POLL,
            appearing([None, None, None]),
        )
        .expect_err("none");
        assert!(started.elapsed() >= Duration::from_millis(50));
        let sources: Vec<Source> = seen.iter().map(|(s, _)| *s).collect();
        assert_eq!(sources, [Source::Disk, Source::NineP, Source::Vsock]);
        // One deadline for all, the sources looked at in turns: as many looks each.
        let looks: Vec<&str> = seen.iter().map(|(_, s)| s.as_str()).collect();
        assert!(
            looks[0] != "1 looks" && looks.iter().all(|l| *l == looks[0]),
            "{seen:?}"
        );
        // Only vsock, no host: no wait at all; no wait given: one look.
        let started = std::time::Instant::now();
        let seen = first_present(
            &[Source::Vsock],
            Duration::from_secs(5),
            POLL,
            appearing([None, None, None]),
        )
        .expect_err("none");
        assert_eq!(seen, [(Source::Vsock, "1 looks".to_owned())]);
        assert!(started.elapsed() < Duration::from_secs(1));
        let seen = first_present(&[Source::Disk], Duration::ZERO, POLL, appearing([None; 3]))
            .expect_err("none");
        assert_eq!(seen, [(Source::Disk, "1 looks".to_owned())]);
    }
}
