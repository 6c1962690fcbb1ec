//! ext4 on a device under test: files written through a mount, e2fsck
//! clean after umount, and the same files read back after a remount (or a
//! new daemon).

use std::path::Path;

use crate::{pattern, run, run_ok};

/// Files an ext4 test writes: (path relative to the mount, contents).
pub struct FileTree(pub Vec<(String, Vec<u8>)>);

impl FileTree {
    /// `dirs` directories `dD/sub{D % 2}`, each with one file `fF` per
    /// length in `lens`; file F of directory D holds `lens[F]` bytes of
    /// [`pattern`] seeded with `D * 10 + F + seed`.
    pub fn new(dirs: usize, lens: &[usize], seed: u64) -> FileTree {
        let mut v = vec![];
        for d in 0..dirs {
            for (f, &len) in lens.iter().enumerate() {
                v.push((format!("d{d}/sub{}/f{f}", d % 2), pattern(len, (d * 10 + f) as u64 + seed)));
            }
        }
        FileTree(v)
    }

    /// Writes every file under `root`, making its directories.
    pub fn write(&self, root: &Path) {
        for (p, data) in &self.0 {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
        }
    }

    /// Asserts every file under `root` holds exactly what [`write`](Self::write)
    /// wrote; `when` names the moment in failures.
    pub fn verify(&self, root: &Path, when: &str) {
        for (p, data) in &self.0 {
            let got = std::fs::read(root.join(p)).unwrap_or_else(|e| panic!("{when}: reading {p}: {e}"));
            assert!(got == *data, "{when}: {p} differs ({} bytes, {} expected)", got.len(), data.len());
        }
    }
}

/// Mounts the ext4 on `dev` at `mnt` (made if missing).
pub fn mount_ext4(dev: &str, mnt: &Path) {
    std::fs::create_dir_all(mnt).unwrap();
    run_ok("mount", &["-t", "ext4", dev, mnt.to_str().unwrap()]);
}

/// Unmounts the filesystem at `mnt`.
pub fn umount(mnt: &Path) {
    run_ok("umount", &[mnt.to_str().unwrap()]);
}

/// Asserts `e2fsck -fn` (check everything, change nothing) finds no
/// problem in the filesystem on `dev`; `when` names the moment in failures.
pub fn fsck_clean(dev: &str, when: &str) {
    let (st, out, err) = run("e2fsck", &["-fn", dev]);
    assert!(st.success(), "{when}: e2fsck -fn {dev} found problems ({st}):\n{out}\n{err}");
}

/// mkfs.ext4 on `dev`, `tree` written through a mount at `mnt`, umount,
/// then [`ext4_check`]: e2fsck -fn clean, remounted, `tree` read back.
/// `what` names the device in failures.
pub fn ext4_write_check(dev: &str, mnt: &Path, tree: &FileTree, what: &str) {
    run_ok("mkfs.ext4", &["-q", "-F", dev]);
    mount_ext4(dev, mnt);
    tree.write(mnt);
    umount(mnt);
    ext4_check(dev, mnt, tree, what);
}

/// Asserts the filesystem on `dev` (unmounted) is e2fsck -fn clean and,
/// mounted at `mnt`, holds `tree` exactly; unmounts it again. Also on its
/// own, e.g. once a new daemon serves the device's data; `when` names the
/// moment in failures.
pub fn ext4_check(dev: &str, mnt: &Path, tree: &FileTree, when: &str) {
    fsck_clean(dev, when);
    mount_ext4(dev, mnt);
    tree.verify(mnt, when);
    umount(mnt);
}

/// mkfs.ext4 on `dev`, a 3 MiB file written and read back through a
/// mount, e2fsck clean in between; `what` names the device in failures.
pub fn ext4_round_trip(dev: &str, what: &str) {
    let tree = FileTree(vec![("f".to_string(), pattern(3 << 20, 15))]);
    ext4_write_check(dev, Path::new("/tmp/ext4-round-trip"), &tree, what);
}
