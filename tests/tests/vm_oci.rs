//! VM test of a container image run as a VM: an OCI layout made by umoci (installed by
//! `qemu/setup.sh`) whose root is the busybox fixture and whose config says Entrypoint
//! `sh -c`, a Cmd, Env `APP=oci`, WorkingDir `/srv/app` and User `app`, baked into an
//! initramfs with nothing said about the hand-off, booted: the init supervises the image's
//! command with its environment, in its working directory, as its user (with the user's
//! supplementary groups and home), and the VM powers off with the command's exit status.
//! Baking OCI layers keeps owners: root only, as the other OCI tests.

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use bootlace_contract::config::InitConfig;
use bootlace_tests::{bake, boot, busybox_rootfs, probe_value, run_tool, scratch, tail};
use bootlace_vm::End;

const SCRIPT: &str = "echo PROBE app=$APP; echo PROBE pwd=$(pwd); \
    echo PROBE ids=$(id -u):$(id -g):$(id -G); echo PROBE home=$HOME; \
    echo PROBE pid1=$(cat /proc/1/comm); sleep 1; exit 7";

/// The busybox fixture with a user `app` (1000, group `app` 1001, also in `wheel` 10), as a
/// layout made by umoci with the config above.
fn umoci_layout(dir: &Path) -> Result<std::path::PathBuf> {
    let root = dir.join("rootfs");
    busybox_rootfs(&root)?;
    let add = |file: &str, text: &str| -> Result<()> {
        let mut t = std::fs::read_to_string(root.join(file))?;
        t.push_str(text);
        Ok(std::fs::write(root.join(file), t)?)
    };
    add("etc/passwd", "app:x:1000:1001:App:/home/app:/bin/sh\n")?;
    add("etc/group", "app:x:1001:\nwheel:x:10:root,app\n")?;
    let layout = dir.join("layout");
    let image = format!("{}:app", layout.display());
    let bundle = dir.join("bundle");
    let umoci = |args: &[&str], path: Option<&Path>| {
        let mut c = Command::new("umoci");
        c.args(args);
        if let Some(p) = path {
            c.arg(p);
        }
        run_tool(&mut c)
    };
    umoci(&["init", "--layout"], Some(&layout))?;
    umoci(&["new", "--image", &image], None)?;
    umoci(&["unpack", "--image", &image], Some(&bundle))?;
    run_tool(
        Command::new("cp")
            .arg("-a")
            .arg(root.join("."))
            .arg(bundle.join("rootfs")),
    )?;
    umoci(&["repack", "--image", &image], Some(&bundle))?;
    let cmd = format!("--config.cmd={SCRIPT}");
    umoci(
        &[
            "config",
            "--image",
            &image,
            "--config.entrypoint=/bin/sh",
            "--config.entrypoint=-c",
            &cmd,
            "--config.env=APP=oci",
            "--config.workingdir=/srv/app",
            "--config.user=app",
        ],
        None,
    )?;
    Ok(layout)
}

#[test]
#[ignore = "needs root"]
fn an_umoci_image_runs_as_a_vm_with_its_config() -> Result<()> {
    let dir = scratch()?;
    let layout = umoci_layout(dir.path())?;
    let img = dir.path().join("app.img");
    // Nothing about the hand-off: the image's config says it all.
    bake(&layout, InitConfig::default(), &img)?;
    let o = boot("oci_config_app", &img, &[])?;
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 30));
    assert_eq!(o.exit_status, Some(7), "{}", tail(&o, 30));
    let value = |k: &str| probe_value(&o, k).unwrap_or_default();
    assert_eq!(value("app"), "oci", "{}", tail(&o, 30));
    assert_eq!(value("pwd"), "/srv/app");
    assert_eq!(value("ids"), "1000:1001:1001 10");
    assert_eq!(value("home"), "/home/app");
    // Supervised: bootlace stays PID 1.
    assert_eq!(value("pid1"), "init", "the initramfs's /init, bootlace");
    assert!(
        o.console
            .contains("supervising /bin/sh -c echo PROBE app=$APP;"),
        "{}",
        tail(&o, 30)
    );
    assert!(
        o.console.contains("in /srv/app as 1000:1001 (groups 10)"),
        "{}",
        tail(&o, 30)
    );
    Ok(())
}
