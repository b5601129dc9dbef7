//! A guest's own identity in an image many guests share, set before the hand-off:
//!
//! - the machine ID (`/etc/machine-id`, and D-Bus's copy `/var/lib/dbus/machine-id` when it is
//!   a file of its own): from the manifest's `instance_id` when there is one, else from the
//!   VM's SMBIOS UUID (QEMU `-uuid`, `bootlace-vm --uuid`), so it is stable across reboots of
//!   one guest, else random; never the one the image ships. Only for images that have
//!   `/etc/machine-id` or hand off to systemd;
//! - the host name a manifest sets, persisted in `/etc/hostname` ([`persist`]), where systemd
//!   reads it again;
//! - when the real init is systemd, the hand-off environment as its `DefaultEnvironment=`
//!   (`/run/systemd/system.conf.d/50-bootlace-env.conf`, 0600), so services see it too.
//!
//! A file of a read-only `/etc` is covered by a bind mount of a file on `/run/bootlace/identity`.

use std::io;
use std::path::{Path, PathBuf};

use bootlace_contract::config::InitConfig;

use crate::sys;
use crate::sys::root::{Root, RootError};

/// The machine ID files.
const MACHINE_ID: &str = "/etc/machine-id";
const DBUS_MACHINE_ID: &str = "/var/lib/dbus/machine-id";

/// Where files covering a read-only `/etc` live.
const RUN_DIR: &str = "/run/bootlace/identity";

/// Where systemd reads runtime configuration of the manager.
const SYSTEMD_CONF: &str = "/run/systemd/system.conf.d";

/// The SMBIOS system UUID, as the kernel shows it.
const PRODUCT_UUID: &str = "/sys/class/dmi/id/product_uuid";

/// Why the identity could not be set.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Writing a file of the root failed.
    #[error("write {path}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: RootError,
    },
    /// Covering a file of a read-only root failed.
    #[error("cover {path} (read-only) with {}", with.display())]
    Cover {
        /// The file.
        path: String,
        /// The file bound over it.
        with: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The systemd configuration could not be written.
    #[error("write {}", path.display())]
    Systemd {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Where a machine ID came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// The manifest's `instance_id`.
    Instance,
    /// The VM's SMBIOS UUID.
    Smbios,
    /// Random: nothing identifies this guest.
    Random,
}

impl IdSource {
    fn as_str(self) -> &'static str {
        match self {
            IdSource::Instance => "from the instance id",
            IdSource::Smbios => "from the SMBIOS UUID",
            IdSource::Random => "random",
        }
    }
}

/// Sets the machine ID and systemd's environment, as the module says. `instance_id`: the
/// manifest's, when one was applied.
pub fn set(config: &InitConfig, instance_id: Option<&str>) -> Result<(), IdentityError> {
    let root = Root::open(Path::new("/")).map_err(|source| IdentityError::Cover {
        path: "/".to_owned(),
        with: PathBuf::from("/"),
        source,
    })?;
    let systemd = hands_off_to_systemd(config);
    if systemd || root.exists(MACHINE_ID) {
        set_machine_id(&root, instance_id)?;
    }
    if systemd {
        let env: Vec<(String, String)> = config
            .handoff
            .env
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_str().to_owned()))
            .collect();
        if !env.is_empty() {
            let path = write_systemd_env(&env)?;
            log::info!(
                "identity: systemd's DefaultEnvironment gets {} variables ({})",
                env.len(),
                path.display()
            );
        }
    }
    Ok(())
}

/// `/etc/machine-id` and D-Bus's copy (see the module).
fn set_machine_id(root: &Root, instance_id: Option<&str>) -> Result<(), IdentityError> {
    let smbios = std::fs::read_to_string(PRODUCT_UUID).ok();
    let (id, from) = machine_id(instance_id, smbios.as_deref(), random_bytes);
    let text = format!("{id}\n");
    match persist(root, MACHINE_ID, &text, 0o444) {
        Ok(()) => {}
        // A read-only /etc without the file: nothing to cover; systemd makes a transient ID.
        Err(e) if !root.exists(MACHINE_ID) => {
            log::warn!(
                "identity: no machine ID written: {}",
                bootlace_contract::chain(&e)
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    // D-Bus's copy, unless it is a link (to /etc/machine-id).
    if std::fs::symlink_metadata(DBUS_MACHINE_ID).is_ok_and(|m| m.is_file()) {
        persist(root, DBUS_MACHINE_ID, &text, 0o444)?;
    }
    log::info!("identity: machine-id {id} ({})", from.as_str());
    Ok(())
}

/// Writes `content` to `path` in the root (atomically, `mode`, root's); when the root is
/// read-only there and `path` exists, binds a file on `/run/bootlace/identity` over it
/// instead.
pub fn persist(root: &Root, path: &str, content: &str, mode: u32) -> Result<(), IdentityError> {
    match root.write_file(path, &mut content.as_bytes(), mode, 0, 0) {
        Ok(_) => Ok(()),
        Err(RootError::Io { source, .. })
            if source.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error())
                && root.exists(path) =>
        {
            let with =
                cover_file(path, content, mode).map_err(|(with, source)| IdentityError::Cover {
                    path: path.to_owned(),
                    with,
                    source,
                })?;
            log::info!(
                "identity: {path} is read-only: {} bound over it",
                with.display()
            );
            Ok(())
        }
        Err(source) => Err(IdentityError::Write {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A file on `/run` holding `content`, bound over `path`.
fn cover_file(path: &str, content: &str, mode: u32) -> Result<PathBuf, (PathBuf, io::Error)> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let with = Path::new(RUN_DIR).join(path.trim_start_matches('/').replace('/', "-"));
    let r = (|| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(RUN_DIR)?;
        std::fs::write(&with, content)?;
        std::fs::set_permissions(&with, std::fs::Permissions::from_mode(mode))?;
        sys::bind_mount(&with, Path::new(path))
    })();
    r.map(|()| with.clone()).map_err(|e| (with, e))
}

/// Whether the hand-off executes systemd (the command, its links followed, is `systemd`).
pub fn hands_off_to_systemd(config: &InitConfig) -> bool {
    runs_systemd(&config.handoff.command)
}

/// Whether `cmd` executes systemd (its program, links followed, is `systemd`).
pub fn runs_systemd(cmd: &bootlace_contract::config::Command) -> bool {
    std::fs::canonicalize(cmd.program())
        .ok()
        .and_then(|p| p.file_name().map(|n| n == "systemd"))
        .unwrap_or(false)
}

/// 16 random bytes, without waiting for the kernel's random pool to be seeded (`GRND_INSECURE`:
/// early in a VM's boot the wait can take seconds; a machine ID must be unique, not secret).
fn random_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    let insecure = rustix::rand::GetRandomFlags::INSECURE;
    if rustix::rand::getrandom(&mut b, insecure).is_err()
        && rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::NONBLOCK).is_err()
    {
        log::warn!("identity: getrandom failed; the machine ID is made of the boot id");
        let boot_id =
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        b = hashed(boot_id.as_bytes());
    }
    b
}

/// The first 16 bytes of the SHA-256 of `data`.
fn hashed(data: &[u8]) -> [u8; 16] {
    let digest = bootlace_contract::digest::of_bytes(data);
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        let pair = digest.hex().get(2 * i..2 * i + 2).unwrap_or("00");
        *byte = u8::from_str_radix(pair, 16).unwrap_or(0);
    }
    b
}

/// The machine ID (32 lowercase hex digits) and where it came from: the instance id (hashed),
/// the SMBIOS UUID when it is set (not all zeros or ones), else `random()`; a made-up ID is
/// shaped as a version-4 UUID, as systemd makes them.
pub fn machine_id(
    instance_id: Option<&str>,
    smbios: Option<&str>,
    random: impl FnOnce() -> [u8; 16],
) -> (String, IdSource) {
    if let Some(id) = instance_id {
        let b = hashed(format!("bootlace machine-id\0{id}").as_bytes());
        return (v4(b), IdSource::Instance);
    }
    let uuid: String = smbios
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| *c != '-')
        .flat_map(char::to_lowercase)
        .collect();
    let set = uuid.len() == 32
        && uuid.chars().all(|c| c.is_ascii_hexdigit())
        && uuid.chars().any(|c| c != '0')
        && uuid.chars().any(|c| c != 'f');
    if set {
        return (uuid, IdSource::Smbios);
    }
    (v4(random()), IdSource::Random)
}

fn v4(mut b: [u8; 16]) -> String {
    if let (Some(version), Some(variant)) = (b.get(6).copied(), b.get(8).copied()) {
        b[6] = (version & 0x0f) | 0x40;
        b[8] = (variant & 0x3f) | 0x80;
    }
    bootlace_contract::digest::hex(&b)
}

/// `/run/systemd/system.conf.d/50-bootlace-env.conf`: `[Manager]` `DefaultEnvironment=` with
/// every variable quoted (`\` and `"` escaped), 0600.
fn write_systemd_env(env: &[(String, String)]) -> Result<PathBuf, IdentityError> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = Path::new(SYSTEMD_CONF).join("50-bootlace-env.conf");
    let err = |source| IdentityError::Systemd {
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(SYSTEMD_CONF)
        .map_err(err)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    f.write_all(default_environment(env).as_bytes())
        .map_err(err)?;
    Ok(path)
}

/// The drop-in's text.
pub fn default_environment(env: &[(String, String)]) -> String {
    let words: Vec<String> = env
        .iter()
        .map(|(k, v)| {
            let escaped: String = format!("{k}={v}")
                .chars()
                .flat_map(|c| match c {
                    '\\' => vec!['\\', '\\'],
                    '"' => vec!['\\', '"'],
                    '\n' => vec!['\\', 'n'],
                    c => vec![c],
                })
                .collect();
            format!("\"{escaped}\"")
        })
        .collect();
    format!(
        "# Written by bootlace-init: the hand-off environment, for every service.\n\
         [Manager]\nDefaultEnvironment={}\n",
        words.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_id_per_guest() {
        let r = || [7u8; 16];
        let (a, from) = machine_id(Some("i-1"), Some("11111111-2222-3333-4444-555555555555"), r);
        assert_eq!(from, IdSource::Instance);
        assert_eq!(a, machine_id(Some("i-1"), None, || [9u8; 16]).0, "stable");
        assert_ne!(a, machine_id(Some("i-2"), None, r).0);
        assert_eq!(a.len(), 32);
        assert_eq!(&a[12..13], "4");
        let (b, from) = machine_id(None, Some("1111AAAA-2222-3333-4444-555555555555\n"), r);
        assert_eq!(
            (b.as_str(), from),
            ("1111aaaa222233334444555555555555", IdSource::Smbios)
        );
        for unset in [
            "00000000-0000-0000-0000-000000000000",
            "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
            "junk",
        ] {
            assert_eq!(
                machine_id(None, Some(unset), r).1,
                IdSource::Random,
                "{unset}"
            );
        }
        let (c, _) = machine_id(None, None, r);
        assert_eq!(c, "07070707070747078707070707070707");
    }

    #[test]
    fn the_environment_is_quoted_for_systemd() {
        let env = vec![
            ("APP_MODE".to_owned(), "production".to_owned()),
            ("GREETING".to_owned(), "say \"hi\" \\ there".to_owned()),
        ];
        let text = default_environment(&env);
        assert!(
            text.ends_with(
                "[Manager]\nDefaultEnvironment=\"APP_MODE=production\" \"GREETING=say \\\"hi\\\" \\\\ there\"\n"
            ),
            "{text}"
        );
    }
}
