//! `bake --format disk` without booting: the bytes of a bootable disk, read back with other
//! tools than the ones that wrote them.
//! - two bakes give the same bytes, in every container (raw, qcow2, vmdk, vhd), and every
//!   container holds the raw disk's bytes (`qemu-img compare`);
//! - the GPT (as sfdisk reads it) is what the metadata says: an EFI system partition, the root
//!   partition with the x86-64 root type, a blank data partition when asked, MiB-aligned;
//! - the EFI system partition is clean FAT32 (fsck.vfat) holding `\EFI\BOOT\BOOTX64.EFI`, a PE
//!   whose `.linux` is the kernel, `.initrd` the stage 1 the metadata names, `.cmdline` the
//!   baked line naming the root partition's PARTUUID;
//! - bad requests are refused with the cause named and nothing left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use bootlace_contract::config::{Command as Argv, InitConfig};
use bootlace_contract::gpt::{self, Guid};
use bootlace_contract::image::{Container, ImageMeta};
use bootlace_image::bake::{self, BakeError, BakeSpec, Format};
use bootlace_image::disk::{self, DiskOptions};
use bootlace_image::uki::Pe;
use bootlace_tests::{artifact, busybox_rootfs, kernel_modules, scratch, test_kernel};
use sha2::{Digest as _, Sha256};

fn spec(rootfs: &Path, out: PathBuf, opts: DiskOptions) -> BakeSpec {
    let mut s = BakeSpec::new(
        Format::Disk,
        out,
        Some(rootfs.to_owned()),
        artifact("bootlace-init").expect("init"),
    );
    s.all_root = true;
    s.modules = Some(kernel_modules(&[]).expect("modules"));
    s.name = Some("bb".to_owned());
    s.mtime = 1_700_000_000;
    let mut cfg = InitConfig::default();
    cfg.handoff.command = Argv::try_from(vec!["/bin/sh".to_owned()]).expect("argv");
    s.config = cfg;
    s.disk = opts;
    s
}

fn hex(b: &[u8]) -> String {
    bootlace_contract::digest::hex(&Sha256::digest(b))
}

fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("open");
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).expect("read");
    buf
}

#[test]
fn two_bakes_give_the_same_bytes_in_every_container() {
    let d = scratch().expect("scratch");
    let rootfs = d.path().join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    let mut raw = None;
    for c in Container::ALL {
        let mut files = Vec::new();
        for run in ["a", "b"] {
            // The same file name in two directories: a VMDK names its own file.
            let dir = d.path().join(run);
            std::fs::create_dir_all(&dir).expect("mkdir");
            let out = dir.join(format!("bb.{c}"));
            let opts = DiskOptions {
                container: c,
                ..DiskOptions::default()
            };
            bake::bake(&spec(&rootfs, out.clone(), opts), &mut |_| {}).expect("bake");
            files.push(out);
        }
        let (a, b) = (&files[0], &files[1]);
        assert!(
            std::fs::read(a).expect("a") == std::fs::read(b).expect("b"),
            "two {c} bakes differ"
        );
        let meta = |p: &Path| std::fs::read(ImageMeta::path_for(p)).expect("meta");
        assert_eq!(meta(a), meta(b), "metadata of two {c} bakes");
        let m = ImageMeta::read(&ImageMeta::path_for(a)).expect("meta");
        assert_eq!(m.schema, bootlace_contract::image::DISK_SCHEMA);
        let info = m.disk.as_ref().expect("disk info");
        assert_eq!(info.container, c);
        if c == Container::Raw {
            raw = Some(a.clone());
        }
        let raw = raw.as_ref().expect("raw first");
        let cmp = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", c.qemu_format()])
            .arg(raw)
            .arg(a)
            .status()
            .expect("qemu-img");
        assert!(
            cmp.success(),
            "the {c} disk does not hold the raw disk's bytes"
        );
        let info_out = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", c.qemu_format()])
            .arg(a)
            .output()
            .expect("qemu-img info");
        let v: serde_json::Value = serde_json::from_slice(&info_out.stdout).expect("json");
        assert_eq!(v["virtual-size"].as_u64(), Some(info.virtual_size), "{c}");
    }
}

#[test]
fn the_disk_is_what_its_metadata_says() {
    let d = scratch().expect("scratch");
    let rootfs = d.path().join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    let out = d.path().join("bb.img");
    let opts = DiskOptions {
        data_size: Some(16 << 20),
        kernel_args: vec!["bootlace.log=debug".to_owned()],
        ..DiskOptions::default()
    };
    bake::bake(&spec(&rootfs, out.clone(), opts), &mut |_| {}).expect("bake");
    let m = ImageMeta::read(&ImageMeta::path_for(&out)).expect("meta");
    let info = m.disk.expect("disk");
    // sfdisk reads the table as the metadata describes it.
    let sf = Command::new("sfdisk")
        .arg("--json")
        .arg(&out)
        .output()
        .expect("sfdisk");
    assert!(sf.status.success(), "{sf:?}");
    let v: serde_json::Value = serde_json::from_slice(&sf.stdout).expect("json");
    let table = &v["partitiontable"];
    assert_eq!(table["label"], "gpt");
    assert_eq!(
        table["id"].as_str().map(str::to_lowercase).as_deref(),
        Some(info.disk_guid.as_str())
    );
    let parts = table["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 3, "{v}");
    let roles: Vec<&str> = info.partitions.iter().map(|p| p.role.as_str()).collect();
    assert_eq!(roles, ["esp", "root", "data"]);
    for (p, s) in info.partitions.iter().zip(parts) {
        assert_eq!(s["start"].as_u64(), Some(p.offset / 512), "{s}");
        assert_eq!(s["size"].as_u64(), Some(p.size / 512), "{s}");
        assert_eq!(p.offset % (1 << 20), 0, "MiB-aligned: {p:?}");
        assert_eq!(
            s["uuid"].as_str().map(str::to_lowercase).as_deref(),
            Some(p.partuuid.as_str())
        );
        assert_eq!(
            s["type"].as_str().map(str::to_lowercase).as_deref(),
            Some(p.type_guid.as_str())
        );
        assert_eq!(s["name"].as_str(), Some(p.name.as_str()));
    }
    assert_eq!(info.partitions[0].type_guid, Guid::ESP.to_string());
    assert_eq!(info.partitions[1].type_guid, Guid::ROOT_X86_64.to_string());
    // The backup table is where the primary says and the same.
    let head = read_at(&out, 0, 34 * 512);
    let t = gpt::parse(&head, 512).expect("gpt");
    assert_eq!(t.disk_sectors * 512, info.virtual_size);
    let (_, tail) = t.write().expect("rewrite");
    assert_eq!(
        read_at(
            &out,
            info.virtual_size - tail.len() as u64,
            tail.len() as u64
        ),
        tail
    );
    // The root partition holds the erofs root; the data partition is blank.
    let root = &info.partitions[1];
    let sb = read_at(&out, root.offset + 1024, 4);
    assert_eq!(
        u32::from_le_bytes(sb.try_into().expect("4")),
        0xE0F5_E1E2,
        "erofs magic"
    );
    let data = &info.partitions[2];
    assert!(read_at(&out, data.offset, 1 << 20).iter().all(|&b| b == 0));
    // The ESP: clean FAT32 with the unified kernel image.
    let esp_part = &info.partitions[0];
    let esp = d.path().join("esp.img");
    std::fs::write(&esp, read_at(&out, esp_part.offset, esp_part.size)).expect("esp");
    let fsck = Command::new("fsck.vfat")
        .arg("-n")
        .arg(&esp)
        .output()
        .expect("fsck");
    assert!(fsck.status.success(), "{fsck:?}");
    let uki = disk::read_boot_file(&esp).expect("BOOTX64.EFI");
    let pe = Pe::read(&uki).expect("PE");
    let section = |n: &str| pe.section(&uki, n).unwrap_or_else(|| panic!("no {n}"));
    let kernel = std::fs::read(test_kernel().expect("kernel").image).expect("kernel");
    assert!(
        section(".linux") == kernel.as_slice(),
        ".linux is not the kernel"
    );
    assert_eq!(hex(&kernel), info.kernel.sha256);
    assert_eq!(hex(section(".initrd")), info.stage1_sha256);
    let cmdline = String::from_utf8(section(".cmdline").to_vec()).expect("utf-8");
    assert_eq!(cmdline.trim_end_matches('\0'), info.cmdline);
    assert!(
        info.cmdline
            .contains(&format!("bootlace.root=PARTUUID={}", root.partuuid)),
        "{}",
        info.cmdline
    );
    assert!(
        info.cmdline.ends_with("bootlace.log=debug"),
        "{}",
        info.cmdline
    );
    assert!(String::from_utf8_lossy(section(".osrel")).contains("NAME=\"bb\""));
}

#[test]
fn bad_disk_bakes_are_refused_and_leave_nothing() {
    let d = scratch().expect("scratch");
    let rootfs = d.path().join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    let outdir = d.path().join("out");
    std::fs::create_dir_all(&outdir).expect("mkdir");
    let out = outdir.join("bb.img");
    let not_a_kernel = d.path().join("vmlinuz-fake");
    std::fs::write(&not_a_kernel, b"MZ not a kernel").expect("write");
    let cases: Vec<(DiskOptions, &str)> = vec![
        (
            DiskOptions {
                fs: bootlace_contract::fs::FsType::Squashfs,
                ..DiskOptions::default()
            },
            "a bootable disk's root is erofs or ext4",
        ),
        (
            DiskOptions {
                kernel: Some(not_a_kernel.clone()),
                ..DiskOptions::default()
            },
            "not an x86 bzImage",
        ),
        (
            DiskOptions {
                stub: Some(d.path().join("no-such-stub")),
                ..DiskOptions::default()
            },
            "install systemd-boot-efi",
        ),
        (
            DiskOptions {
                stub: Some(not_a_kernel.clone()),
                ..DiskOptions::default()
            },
            "EFI stub",
        ),
        (
            DiskOptions {
                esp_size: Some(1 << 20),
                ..DiskOptions::default()
            },
            "give --esp-size",
        ),
    ];
    for (opts, says) in cases {
        let err = bake::bake(&spec(&rootfs, out.clone(), opts.clone()), &mut |_| {})
            .expect_err("refused");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains(says), "{opts:?}: {chain}");
        let left: Vec<_> = std::fs::read_dir(&outdir).expect("ls").flatten().collect();
        assert!(left.is_empty(), "{opts:?} left {left:?}");
    }
    // Disk flags with another format.
    let mut s = spec(&rootfs, out.clone(), DiskOptions::default());
    s.format = Format::Erofs;
    s.disk.data_size = Some(1 << 20);
    let err = bake::bake(&s, &mut |_| {}).expect_err("refused");
    assert!(matches!(err, BakeError::FlagNotForFormat { .. }), "{err}");
    assert!(std::fs::read_dir(&outdir).expect("ls").next().is_none());
}
