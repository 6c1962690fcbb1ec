//! Tests that need the kernel's ublk driver run natively when the build host
//! has `/dev/ublk-control`; elsewhere they are marked ignored (with the
//! reason) and run in the VM, where `cargo xtask test-vm` passes
//! `--include-ignored`.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(ublk_native_driver)");
    println!("cargo::rerun-if-changed=/dev/ublk-control");
    if std::path::Path::new("/dev/ublk-control").exists() {
        println!("cargo::rustc-cfg=ublk_native_driver");
    }
}
