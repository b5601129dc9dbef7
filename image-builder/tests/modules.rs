//! An image with kernel modules of its own (a distribution root): the bake keeps them and
//! their `modules.dep` lines, adds what it copies, and rewrites the binary indexes with depmod
//! so that kmod (`modprobe`, systemd's loader) resolves both; an image without its own gets the
//! binary indexes of what it copies. Real modules of the machine's kernel (`make setup`
//! installs linux-image-amd64), an initramfs (no root needed), read back with `modprobe -d`.

use std::path::{Path, PathBuf};
use std::process::Command;

use bootlace_contract::config::{InitConfig, ModuleName};
use bootlace_image::bake::{bake, BakeSpec, Compression, Format};
use bootlace_image::cpio::{self, Kind};
use bootlace_image::initramfs::Modules;

/// The one kernel release under /lib/modules with a vfat module (the test kernel's).
fn release() -> String {
    let mut found: Vec<String> = std::fs::read_dir("/lib/modules")
        .expect("/lib/modules: make setup installs linux-image-amd64")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|r| Path::new(&format!("/lib/modules/{r}/kernel/fs/fat/vfat.ko")).exists())
        .collect();
    found.sort();
    found.pop().expect("a kernel release with vfat.ko")
}

/// Extracts the files and symlinks of an uncompressed archive under `lib/modules` (and `/lib`
/// itself, a link on a merged-/usr image) into `into`.
fn extract_modules(archive: &Path, into: &Path) {
    let entries = cpio::read_all(&std::fs::read(archive).expect("read")).expect("parse");
    for e in entries {
        let name = &e.header.name;
        if !name.contains("lib/modules/") && name != "lib" {
            continue;
        }
        let at = into.join(name);
        match &e.header.kind {
            Kind::Dir => std::fs::create_dir_all(&at).expect("mkdir"),
            Kind::File { .. } => {
                std::fs::create_dir_all(at.parent().expect("parent")).expect("mkdir");
                std::fs::write(&at, &e.data).expect("write");
            }
            Kind::Symlink { target } => {
                std::fs::create_dir_all(at.parent().expect("parent")).expect("mkdir");
                std::os::unix::fs::symlink(target, &at).expect("symlink");
            }
            _ => {}
        }
    }
}

/// What `modprobe --show-depends` says for `module` in the extracted tree (binary indexes).
fn show_depends(root: &Path, release: &str, module: &str) -> String {
    let out = Command::new("modprobe")
        .arg("-d")
        .arg(root)
        .args(["-S", release, "--show-depends", module])
        .output()
        .expect("modprobe (kmod)");
    assert!(
        out.status.success(),
        "modprobe --show-depends {module}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn spec(dir: &Path, input: PathBuf, release: &str) -> BakeSpec {
    let init = dir.join("bootlace-init");
    std::fs::write(&init, b"\x7fELF fake init").expect("init");
    let mut s = BakeSpec::new(Format::Initramfs, dir.join("out.cpio"), Some(input), init);
    s.config = InitConfig {
        modules: vec![ModuleName::try_from("9p".to_owned()).expect("name")],
        ..InitConfig::default()
    };
    s.modules = Some(Modules {
        root: PathBuf::from("/lib/modules"),
        release: release.to_owned(),
        extra: Vec::new(),
    });
    s.all_root = true;
    s.mtime = 1_700_000_000;
    s.compress = Some(Compression::None);
    s
}

#[test]
fn the_images_own_modules_stay_and_every_index_covers_both() {
    let release = release();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("rootfs");
    // The image's own tree: fat and vfat, its own modules.dep, a stale binary index.
    let mine = input.join(format!("usr/lib/modules/{release}"));
    std::fs::create_dir_all(mine.join("kernel/fs/fat")).expect("mkdir");
    for m in ["fat", "vfat"] {
        std::fs::copy(
            format!("/lib/modules/{release}/kernel/fs/fat/{m}.ko"),
            mine.join(format!("kernel/fs/fat/{m}.ko")),
        )
        .expect("copy");
    }
    let their_dep = "kernel/fs/fat/fat.ko:\nkernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\n";
    std::fs::write(mine.join("modules.dep"), their_dep).expect("dep");
    std::fs::write(mine.join("modules.dep.bin"), b"stale").expect("bin");
    std::os::unix::fs::symlink("usr/lib", input.join("lib")).expect("merged /usr");
    // The image has kmod (through /bin -> usr/bin): it gets modules.devname.
    std::fs::create_dir_all(input.join("usr/bin")).expect("mkdir");
    std::fs::write(input.join("usr/bin/kmod"), b"kmod").expect("kmod");
    std::os::unix::fs::symlink("usr/bin", input.join("bin")).expect("merged /usr");
    let s = spec(dir.path(), input.clone(), &release);
    let report = bake(&s, &mut |_| {}).expect("bake");
    assert!(report.meta.modules.contains(&"9p".to_owned()));
    let tree = dir.path().join("extracted");
    extract_modules(&s.out, &tree);
    let top = tree.join(format!("usr/lib/modules/{release}"));
    // The image's lines first, as they were, then the bake's.
    let dep = std::fs::read_to_string(top.join("modules.dep")).expect("dep");
    assert!(dep.starts_with(their_dep), "{dep}");
    assert!(dep.contains("kernel/fs/9p/9p.ko:"), "{dep}");
    assert_eq!(dep.matches("kernel/fs/fat/fat.ko:").count(), 1, "{dep}");
    assert_ne!(
        std::fs::read(top.join("modules.dep.bin")).expect("bin"),
        b"stale"
    );
    // kmod reads the binary indexes: both the image's module and the bake's resolve.
    let vfat = show_depends(&tree, &release, "vfat");
    assert!(
        vfat.contains("fat/fat.ko") && vfat.contains("fat/vfat.ko"),
        "{vfat}"
    );
    let ninep = show_depends(&tree, &release, "9p");
    assert!(
        ninep.contains("9p/9p.ko") && ninep.contains("9pnet.ko"),
        "{ninep}"
    );
    assert!(top.join("modules.devname").is_file());
    // The input is left as it was.
    assert_eq!(
        std::fs::read(mine.join("modules.dep.bin")).expect("bin"),
        b"stale"
    );
}

#[test]
fn an_image_without_modules_gets_the_indexes_of_what_is_copied() {
    let release = release();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("rootfs");
    std::fs::create_dir_all(input.join("etc")).expect("mkdir");
    let s = spec(dir.path(), input, &release);
    bake(&s, &mut |_| {}).expect("bake");
    let tree = dir.path().join("extracted");
    extract_modules(&s.out, &tree);
    let top = tree.join(format!("lib/modules/{release}"));
    for index in ["modules.dep", "modules.dep.bin", "modules.alias.bin"] {
        assert!(top.join(index).is_file(), "{index} missing");
    }
    let ninep = show_depends(&tree, &release, "9p");
    assert!(ninep.contains("9p/9p.ko"), "{ninep}");
    // No kmod in the image: no modules.devname for systemd's kmod-static-nodes to trip on.
    assert!(!top.join("modules.devname").exists());
}
