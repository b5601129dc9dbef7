//! The bootstrap: find the bootstrap filesystem (a disk by label, a 9p share by tag), mount it
//! read-only at `/.bootstrap`, apply its manifest, then unmount and remove `/.bootstrap` —
//! on success and on failure alike, so nothing of it (it may hold secrets) outlives the step.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bootlace_contract::drivers;
use bootlace_contract::manifest::{Manifest, ManifestError, MANIFEST_NAME};

use crate::apply::{self, Applied, ApplyError};
use crate::blkprobe::{self, FsType};
use crate::boot::Timeline;
use crate::hostlink::HostLink;
use crate::modload::ModuleLoader;
use crate::sys::{self, root::Root, Flags};
use bootlace_contract::config::{Bootstrap, InitConfig, Source};

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
    /// The vsock source needs a host.
    #[error("the vsock source needs a host (host.address or bootlace.host=)")]
    NoHost,
    /// The vsock source needs a pinned digest.
    #[error("the vsock source needs a pinned digest (host.digest or bootlace.digest=sha256:…)")]
    NoDigest,
    /// Fetching the bundle from the host failed.
    #[error("fetch from the host")]
    Fetch(#[source] bootlace_agent::client::ClientError),
    /// The bundle's digest is not the pinned one.
    #[error("bundle digest mismatch: received sha256:{got}, pinned sha256:{pinned}; nothing was extracted")]
    Digest {
        /// Computed over the bytes as received.
        got: String,
        /// Pinned in the config.
        pinned: String,
    },
    /// Unpacking the bundle failed (the tmpfs holding it is discarded).
    #[error("unpack the bundle into {BOOTSTRAP_DIR}")]
    Extract(#[source] crate::extract::ExtractError),
    /// The manifest is missing or invalid.
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
    /// Whether this is an invalid manifest (reported as a configuration error).
    pub fn is_config(&self) -> bool {
        matches!(self, BootstrapError::Manifest(_))
    }
}

/// A bootstrap filesystem that was found.
#[derive(Debug, Clone)]
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

impl Found {
    fn describe(&self) -> String {
        match self {
            Found::Disk { dev, fstype } => format!("{} ({})", dev.display(), fstype.as_str()),
            Found::NineP { tag } => format!("9p share {tag:?}"),
            Found::Vsock => "the host's bundle over vsock".to_owned(),
        }
    }
}

/// The mount tags of the virtio 9p shares present.
pub fn ninep_tags(driver_dir: &Path) -> Vec<String> {
    let mut tags: Vec<String> = std::fs::read_dir(driver_dir)
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let tag = std::fs::read(e.path().join("mount_tag")).ok()?;
                let tag = String::from_utf8_lossy(&tag);
                Some(tag.trim_end_matches(['\0', '\n']).to_owned())
            })
            .collect()
        })
        .unwrap_or_default();
    tags.sort();
    tags
}

/// Probes one source once: the match, or a description of what was seen.
fn probe(source: Source, cfg: &Bootstrap) -> Result<Found, String> {
    match source {
        Source::Disk => {
            let candidates = blkprobe::scan(Path::new("/sys/class/block"), Path::new("/dev"));
            let want = cfg.label.as_str();
            if let Some(c) = candidates.iter().find(|c| {
                c.probed
                    .as_ref()
                    .is_some_and(|p| p.label.as_deref() == Some(want))
            }) {
                if let Some(p) = &c.probed {
                    return Ok(Found::Disk {
                        dev: c.dev.clone(),
                        fstype: p.fstype,
                    });
                }
            }
            let seen: Vec<String> = candidates
                .iter()
                .map(|c| match &c.probed {
                    Some(p) => format!(
                        "{} ({}, label {})",
                        c.dev.display(),
                        p.fstype.as_str(),
                        p.label
                            .as_deref()
                            .map_or("none".to_owned(), |l| format!("{l:?}"))
                    ),
                    None => format!("{} (no known filesystem)", c.dev.display()),
                })
                .collect();
            Err(if seen.is_empty() {
                "no block devices".to_owned()
            } else {
                seen.join(", ")
            })
        }
        Source::Vsock => Err("no host".to_owned()),
        Source::NineP => {
            let tags = ninep_tags(Path::new("/sys/bus/virtio/drivers/9pnet_virtio"));
            if tags.iter().any(|t| t == cfg.tag.as_str()) {
                return Ok(Found::NineP {
                    tag: cfg.tag.as_str().to_owned(),
                });
            }
            Err(if tags.is_empty() {
                "no 9p shares".to_owned()
            } else {
                format!("9p tags {tags:?}")
            })
        }
    }
}

/// Tries the configured sources in order, each waiting up to `wait_ms` for its device. The
/// vsock source is "found" when a host is connected.
pub fn find(
    cfg: &Bootstrap,
    loader: &mut ModuleLoader,
    link: &HostLink,
) -> Result<Option<Found>, BootstrapError> {
    let mut probed = Vec::new();
    for &source in &cfg.sources {
        if source == Source::Vsock {
            if link.is_connected() {
                return Ok(Some(Found::Vsock));
            }
            probed.push("vsock (no host connected)".to_owned());
            continue;
        }
        let loaded = loader.load_best_effort(drivers::source(source));
        if !loaded.is_empty() {
            log::debug!("{} source: loaded {}", source.as_str(), loaded.join(" "));
        }
        let wait = Duration::from_millis(cfg.wait_ms);
        let deadline = Instant::now() + wait;
        loop {
            match probe(source, cfg) {
                Ok(found) => return Ok(Some(found)),
                Err(seen) if Instant::now() >= deadline => {
                    let wanted = match source {
                        Source::Disk => format!("label {:?}", cfg.label.as_str()),
                        Source::NineP | Source::Vsock => format!("tag {:?}", cfg.tag.as_str()),
                    };
                    probed.push(format!(
                        "{} (waited {} ms for {wanted}; saw {seen})",
                        source.as_str(),
                        wait.as_millis()
                    ));
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
    let probed = if probed.is_empty() {
        "no sources configured".to_owned()
    } else {
        probed.join("; ")
    };
    if cfg.required {
        Err(BootstrapError::NotFound { probed })
    } else {
        log::warn!("bootstrap not found (optional): probed {probed}");
        Ok(None)
    }
}

fn mount(
    found: &Found,
    config: &InitConfig,
    loader: &mut ModuleLoader,
    link: &mut HostLink,
) -> Result<(), BootstrapError> {
    let dir = Path::new(BOOTSTRAP_DIR);
    let err = |source| BootstrapError::Mount {
        what: found.describe(),
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
        Found::NineP { tag } => sys::mount(
            tag,
            dir,
            "9p",
            flags,
            c"trans=virtio,version=9p2000.L,msize=262144",
        )
        .map_err(err),
        Found::Vsock => fetch_and_unpack(config, link),
    }
}

/// Fetches the host's bundle into an unnamed file in /run, checks its sha256 against the
/// pinned digest, and only then unpacks it into a fresh tmpfs on `/.bootstrap`, made
/// read-only afterwards. On any error the caller's cleanup unmounts the tmpfs: nothing of a
/// bad bundle stays.
fn fetch_and_unpack(config: &InitConfig, link: &mut HostLink) -> Result<(), BootstrapError> {
    use std::io::{Seek, SeekFrom};
    let pinned = config
        .host
        .digest
        .as_ref()
        .ok_or(BootstrapError::NoDigest)?;
    let client = link.client().ok_or(BootstrapError::NoHost)?;
    let max = config.host.max_bundle_bytes;
    let dir = Path::new(BOOTSTRAP_DIR);
    let ioerr = |what: &str| {
        let what = what.to_owned();
        move |source| BootstrapError::Mount { what, source }
    };
    let mut file =
        sys::anonymous_file(Path::new("/run")).map_err(ioerr("a temporary file in /run"))?;
    let got = client
        .fetch_bundle(&mut file, max)
        .map_err(BootstrapError::Fetch)?;
    let secs = got.elapsed.as_secs_f64().max(1e-9);
    log::info!(
        "bootstrap: fetched {} bytes ({}) from the host in {} ms ({:.1} MB/s)",
        got.header.size,
        got.header.compression,
        got.elapsed.as_millis(),
        got.header.size as f64 / secs / 1e6
    );
    if got.sha256 != pinned.hex() {
        return Err(BootstrapError::Digest {
            got: got.sha256,
            pinned: pinned.hex().to_owned(),
        });
    }
    let compression: crate::extract::Compression = got.header.compression.parse().map_err(
        |e: bootlace_contract::compression::UnknownCompression| BootstrapError::Mount {
            what: format!("bundle compression {:?}", got.header.compression),
            source: std::io::Error::other(e),
        },
    )?;
    let opts = std::ffi::CString::new(format!("mode=0700,size={}", max.saturating_add(1 << 20)))
        .map_err(|e| BootstrapError::Mount {
            what: "tmpfs".to_owned(),
            source: std::io::Error::other(e),
        })?;
    let flags = Flags {
        nosuid: true,
        nodev: true,
        noexec: false,
        rdonly: false,
    };
    sys::mount("tmpfs", dir, "tmpfs", flags, &opts).map_err(ioerr("tmpfs"))?;
    file.seek(SeekFrom::Start(0))
        .map_err(ioerr("the received bundle"))?;
    let root = Root::open(dir).map_err(ioerr("tmpfs"))?;
    let limits = crate::extract::Limits {
        max_bytes: max,
        ..crate::extract::Limits::default()
    };
    let summary = crate::extract::extract(&mut file, got.header.size, compression, &root, &limits)
        .map_err(BootstrapError::Extract)?;
    drop(file);
    sys::remount_read_only(dir).map_err(ioerr("read-only remount"))?;
    log::info!(
        "bootstrap: unpacked {} entries ({} bytes) into a tmpfs on {BOOTSTRAP_DIR}",
        summary.entries,
        summary.bytes
    );
    Ok(())
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

/// Unmounts `/.bootstrap` (innermost first), checks mountinfo has nothing left under it, and
/// removes the then empty directory. A mount that stays busy is reported and nothing is
/// deleted: never a recursive delete over a filesystem that might still be mounted.
pub fn cleanup() -> Result<(), BootstrapError> {
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
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) => {
            // A read-only root keeps its (now empty, unmounted) mount point: the image has it.
            return Ok(());
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
    Ok(())
}

/// What [`run`] calls once the manifest is applied, before the cleanup: the boot reports
/// READY there, so the host learns of it without waiting for the unmount.
pub type OnApplied<'a> = &'a mut dyn FnMut(&InitConfig, &mut Timeline, &mut HostLink);

/// Finds, mounts and applies the bootstrap, calls `on_applied`, then cleans up. Returns the
/// config for the hand-off (with the manifest's environment and hand-off overrides) and
/// whether `on_applied` was called; the config as it was when an optional bootstrap is absent.
pub fn run(
    config: &InitConfig,
    loader: &mut ModuleLoader,
    timeline: &mut Timeline,
    link: &mut HostLink,
    on_applied: OnApplied<'_>,
) -> Result<(InitConfig, bool), BootstrapError> {
    let mark = |timeline: &mut Timeline, link: &mut HostLink, name: &'static str, ok: bool| {
        let before = timeline.last();
        timeline.mark(name);
        let state = if ok { "finished" } else { "failed" };
        link.step(name, state, timeline.last().saturating_sub(before), None);
    };
    let Some(found) = find(&config.bootstrap, loader, link)? else {
        return Ok((config.clone(), false));
    };
    mark(timeline, link, "bootstrap_found", true);
    log::info!("bootstrap: found {}", found.describe());
    if let Err(e) = mount(&found, config, loader, link) {
        mark(timeline, link, "bootstrap_mounted", false);
        if let Err(c) = cleanup() {
            log::error!("{}", crate::boot::chain(&c));
        }
        return Err(e);
    }
    mark(timeline, link, "bootstrap_mounted", true);
    log::info!(
        "bootstrap: mounted {} read-only on {BOOTSTRAP_DIR}",
        found.describe()
    );
    let result = read_and_apply(config, loader);
    mark(timeline, link, "manifest_done", result.is_ok());
    if let Ok((cfg, _)) = &result {
        on_applied(cfg, timeline, link);
    }
    let cleaned = cleanup();
    mark(timeline, link, "cleanup_done", cleaned.is_ok());
    match (result, cleaned) {
        (Ok((cfg, applied)), Ok(())) => {
            log::info!(
                "bootstrap: applied {} ({}); {BOOTSTRAP_DIR} unmounted{}",
                MANIFEST_NAME,
                applied.summary(),
                if Path::new(BOOTSTRAP_DIR).exists() {
                    " (its empty mount point stays on the read-only root)"
                } else {
                    " and removed"
                }
            );
            Ok((cfg, true))
        }
        (Err(e), Ok(())) => Err(e),
        (Ok(_), Err(c)) => Err(c),
        (Err(e), Err(c)) => {
            log::error!("{}", crate::boot::chain(&c));
            Err(e)
        }
    }
}

fn read_and_apply(
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
            source: sys::root::RootError::Io {
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
    let file = bundle.open_file(MANIFEST_NAME).map_err(|e| {
        BootstrapError::Manifest(ManifestError::Read {
            path: manifest_path.clone(),
            source: io::Error::other(e.to_string()),
        })
    })?;
    let manifest = Manifest::read_from(file, &manifest_path).map_err(BootstrapError::Manifest)?;
    let mut cfg = config.clone();
    apply::merge_handoff(&mut cfg, &manifest);
    let applied =
        apply::apply(&manifest, root, bundle, loader, &cfg).map_err(BootstrapError::Apply)?;
    Ok((cfg, applied))
}
