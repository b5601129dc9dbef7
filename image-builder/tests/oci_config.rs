//! An OCI image's config makes the hand-off: layouts made by a real tool (umoci, installed by
//! `qemu/setup.sh`) from the busybox fixture, baked into an initramfs, and the baked init.toml
//! read back: Entrypoint + Cmd supervised with the image's Env, WorkingDir and User resolved
//! against its /etc/passwd and /etc/group; `--exec`, `--cmd`, `--handoff`, a `--config` that
//! sets the command, `--ignore-image-config`; a user or group the image does not have, a
//! program not in its PATH and a config over `--max-json-bytes` refused naming them. Layers
//! keep owners: as the other OCI tests, these need root.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use bootlace_contract::config::{Command as Argv, HandoffMode, InitConfig, UnixId};
use bootlace_image::bake::{bake, BakeSpec, Format};
use bootlace_image::limits::Limits;

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A stand-in init: a script that answers `--version`.
fn fake_init(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("bootlace-init");
    std::fs::write(&p, "#!/bin/sh\necho bootlace-init 9.9.9\n")?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

/// A layout `DIR/layout:app` made by umoci from the busybox fixture (with a user `app`, 1000,
/// group `app` 1001, in `wheel` and `audio`), its config set by `umoci config` with `config`.
fn umoci_layout(dir: &Path, config: &[&str]) -> Result<PathBuf> {
    ensure!(
        Command::new("umoci").arg("--version").output().is_ok(),
        "umoci is missing: `make setup` (qemu/setup.sh) installs it"
    );
    let root = dir.join("rootfs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/busybox-rootfs.sh");
    run(Command::new("bash").arg(&script).arg(&root))?;
    let mut passwd = std::fs::read_to_string(root.join("etc/passwd"))?;
    passwd.push_str("app:x:1000:1001:App:/home/app:/bin/sh\n");
    std::fs::write(root.join("etc/passwd"), passwd)?;
    let mut group = std::fs::read_to_string(root.join("etc/group"))?;
    group.push_str("app:x:1001:\nwheel:x:10:root,app\naudio:x:29:app\nstaff:x:50:\n");
    std::fs::write(root.join("etc/group"), group)?;
    let layout = dir.join("layout");
    let image = format!("{}:app", layout.display());
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    let bundle = dir.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle))?;
    run(Command::new("cp")
        .arg("-a")
        .arg(root.join("."))
        .arg(bundle.join("rootfs")))?;
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle))?;
    run(Command::new("umoci")
        .args(["config", "--image", &image])
        .args(config))?;
    Ok(layout)
}

/// The usual config of these tests: `/bin/sh -c SCRIPT` as `app` in `/srv/app`.
const APP: &[&str] = &[
    "--config.entrypoint=sh",
    "--config.entrypoint=-c",
    "--config.cmd=echo APP=$APP; exit 7",
    "--config.env=APP=oci",
    "--config.env=PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    "--config.workingdir=/srv/app/",
    "--config.user=app",
];

/// Bakes an initramfs of `spec` and returns its init.toml and the archive's paths.
fn baked(spec: &BakeSpec) -> Result<(InitConfig, Vec<String>, Vec<String>)> {
    let mut notes = Vec::new();
    bake(spec, &mut |n| notes.push(n.to_owned()))?;
    let raw = std::fs::read(&spec.out)?;
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut data)?;
    let entries = bootlace_image::cpio::read_all(&data)?;
    let toml = entries
        .iter()
        .find(|e| e.header.name == "etc/bootlace/init.toml")
        .context("no init.toml")?;
    let config = InitConfig::from_toml(std::str::from_utf8(&toml.data)?, Path::new("init.toml"))?;
    let paths = entries.iter().map(|e| e.header.name.clone()).collect();
    Ok((config, paths, notes))
}

fn spec(dir: &Path, layout: &Path, name: &str) -> Result<BakeSpec> {
    let mut s = BakeSpec::new(
        Format::Initramfs,
        dir.join(format!("{name}.img")),
        Some(layout.to_owned()),
        fake_init(dir)?,
    );
    s.mtime = 1_700_000_000;
    Ok(s)
}

fn env(c: &InitConfig) -> Vec<String> {
    c.handoff
        .env
        .iter()
        .map(|(k, v)| format!("{}={}", k.as_str(), v.as_str()))
        .collect()
}

#[test]
#[ignore = "needs root"]
fn an_umoci_images_config_is_the_supervised_app() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let layout = umoci_layout(tmp.path(), APP)?;
    let (c, paths, notes) = baked(&spec(tmp.path(), &layout, "app")?)?;
    assert_eq!(c.handoff.mode, HandoffMode::Supervise);
    // `sh` found in the image's PATH; Entrypoint then Cmd.
    assert_eq!(
        c.handoff.command.to_string(),
        "/bin/sh -c echo APP=$APP; exit 7"
    );
    assert_eq!(
        env(&c),
        [
            "APP=oci",
            "HOME=/home/app",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
        ]
    );
    assert_eq!(
        c.handoff.workdir.as_ref().map(|w| w.as_str()),
        Some("/srv/app")
    );
    assert_eq!(c.handoff.user.map(u32::from), Some(1000));
    assert_eq!(c.handoff.group.map(u32::from), Some(1001));
    let groups: Vec<u32> = c.handoff.groups.iter().map(|g| u32::from(*g)).collect();
    assert_eq!(groups, [10, 29]);
    // The working directory is made in the image (Docker makes a missing one).
    assert!(paths.iter().any(|p| p == "srv/app"), "{paths:?}");
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("image config: supervise /bin/sh -c")
                && n.contains("(Entrypoint + Cmd)")
                && n.contains("User app = 1000:1001 (groups 10,29)")),
        "{notes:?}"
    );

    // --exec replaces Entrypoint and Cmd (docker run --entrypoint); the mode stays the
    // config's (exec) and Env, WorkingDir and User still apply.
    let mut s = spec(tmp.path(), &layout, "exec")?;
    s.config.handoff.command = Argv::try_from(vec!["/bin/true".to_owned()])?;
    s.image_config.command_given = true;
    let (c, _, _) = baked(&s)?;
    assert_eq!(c.handoff.mode, HandoffMode::Exec);
    assert_eq!(c.handoff.command.to_string(), "/bin/true");
    assert_eq!(c.handoff.user.map(u32::from), Some(1000));
    assert!(env(&c).contains(&"APP=oci".to_owned()));

    // --cmd replaces Cmd alone; --handoff exec is kept.
    let mut s = spec(tmp.path(), &layout, "cmd")?;
    s.image_config.cmd = Some(vec!["exit 3".to_owned()]);
    s.image_config.mode_given = true;
    let (c, _, _) = baked(&s)?;
    assert_eq!(c.handoff.command.to_string(), "/bin/sh -c exit 3");
    assert_eq!(c.handoff.mode, HandoffMode::Exec);

    // The config's own env and user win over the image's.
    let mut s = spec(tmp.path(), &layout, "ours")?;
    s.config
        .handoff
        .env
        .insert("APP".to_owned().try_into()?, "ours".to_owned().try_into()?);
    s.config.handoff.user = Some(UnixId::try_from(5)?);
    let (c, _, _) = baked(&s)?;
    assert!(env(&c).contains(&"APP=ours".to_owned()), "{:?}", env(&c));
    assert_eq!(
        (c.handoff.user.map(u32::from), c.handoff.group),
        (Some(5), None)
    );

    // --ignore-image-config: today's default hand-off.
    let mut s = spec(tmp.path(), &layout, "ignored")?;
    s.image_config.apply = false;
    let (c, _, _) = baked(&s)?;
    assert_eq!(c.handoff, InitConfig::default().handoff);
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn the_cli_takes_the_image_config_unless_the_flags_or_config_give_the_command() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let layout = umoci_layout(tmp.path(), APP)?;
    let init = fake_init(tmp.path())?;
    let bake_cli = |name: &str, extra: &[&str]| -> Result<InitConfig> {
        let out = tmp.path().join(format!("{name}.img"));
        run(Command::new(env!("CARGO_BIN_EXE_bootlace-image"))
            .args([
                "bake",
                "--format",
                "initramfs",
                "--no-cache",
                "-q",
                "--input",
            ])
            .arg(&layout)
            .arg("--init")
            .arg(&init)
            .arg("--out")
            .arg(&out)
            .args(extra))?;
        let s = spec(tmp.path(), &layout, name)?;
        let raw = std::fs::read(&s.out)?;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut data)?;
        let e = bootlace_image::cpio::read_all(&data)?
            .into_iter()
            .find(|e| e.header.name == "etc/bootlace/init.toml")
            .context("no init.toml")?;
        Ok(InitConfig::from_toml(
            std::str::from_utf8(&e.data)?,
            Path::new("t"),
        )?)
    };
    let c = bake_cli("plain", &[])?;
    assert_eq!(
        c.handoff.command.to_string(),
        "/bin/sh -c echo APP=$APP; exit 7"
    );
    let c = bake_cli("cmd", &["--cmd", "'exit 4'"])?;
    assert_eq!(c.handoff.command.to_string(), "/bin/sh -c exit 4");
    let c = bake_cli("exec", &["--exec", "/sbin/init", "--handoff", "exec"])?;
    assert_eq!(c.handoff.command.to_string(), "/sbin/init");
    assert_eq!(c.handoff.mode, HandoffMode::Exec);
    // A --config that names the command keeps it (and its mode).
    let cfg = tmp.path().join("init.toml");
    std::fs::write(&cfg, "version = 1\n[handoff]\ncommand = [\"/bin/app\"]\n")?;
    let c = bake_cli("config", &["--config", cfg.to_str().context("utf-8")?])?;
    assert_eq!(c.handoff.command.to_string(), "/bin/app");
    assert_eq!(c.handoff.mode, HandoffMode::Exec);
    assert_eq!(
        c.handoff.user.map(u32::from),
        Some(1000),
        "User still applies"
    );
    let c = bake_cli("ignored", &["--ignore-image-config"])?;
    assert_eq!(c.handoff, InitConfig::default().handoff);
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn what_the_image_does_not_have_is_refused_naming_it() -> Result<()> {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--config.user=nosuch"],
            "User: \"nosuch\": user \"nosuch\" is not in the image's /etc/passwd",
        ),
        (
            &["--config.user=app:nogroup"],
            "group \"nogroup\" is not in the image's /etc/group",
        ),
        (
            &["--config.cmd=nosuchprogram"],
            "Cmd[0]: \"nosuchprogram\" is not in the image's PATH",
        ),
        (
            &["--config.workingdir=srv"],
            "WorkingDir: \"srv\" is not an absolute path",
        ),
        (
            &["--config.env=BAD-NAME=1"],
            "Env[0]: environment variable name \"BAD-NAME\"",
        ),
    ];
    let tmp = tempfile::tempdir()?;
    let layout = umoci_layout(tmp.path(), &[])?;
    for (i, (config, want)) in cases.iter().enumerate() {
        // Each case a tag of its own in the one layout, picked by --oci-ref.
        let tag = format!("case{i}");
        let image = format!("{}:app", layout.display());
        run(Command::new("umoci")
            .args(["config", "--image", &image, "--tag", &tag])
            .args(*config))?;
        let mut s = spec(tmp.path(), &layout, &tag)?;
        s.oci_ref = Some(tag);
        let e = format!(
            "{:#}",
            anyhow::Error::from(bake(&s, &mut |_| {}).expect_err(want))
        );
        assert!(
            e.contains("OCI layout") && e.contains("(config sha256:"),
            "{e}"
        );
        assert!(e.contains(want), "{config:?}: {e}");
        assert!(!s.out.exists(), "nothing left at --out");
    }
    // The config is a JSON document of the layout: bounded by --max-json-bytes.
    let tmp = tempfile::tempdir()?;
    let big = format!("--config.env=BIG={}", "x".repeat(8192));
    let layout = umoci_layout(tmp.path(), &[big.as_str()])?;
    let mut s = spec(tmp.path(), &layout, "big")?;
    s.limits = Limits {
        json_bytes: 4096,
        ..Limits::default()
    };
    let e = bake(&s, &mut |_| {})
        .expect_err("over the limit")
        .to_string();
    assert!(e.contains("--max-json-bytes"), "{e}");
    Ok(())
}
