//! Prints which header ublk-sys was built from and what it defines.
fn main() {
    let (a, b, c) = ublk_sys::HEADER_LINUX_VERSION;
    println!("header {}", env!("UBLK_SYS_HEADER")); // the build script's path, on this machine
    println!("linux_version {a}.{b}.{c}");
    let names = |v: &[(&str, u64)]| v.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(",");
    println!("flags {}: {}", ublk_sys::HEADER_FLAGS.len(), names(ublk_sys::HEADER_FLAGS));
    let cmds: Vec<_> = ublk_sys::HEADER_COMMANDS.iter().map(|(n, _)| *n).collect();
    println!("commands {}: {}", cmds.len(), cmds.join(","));
    let pt: Vec<_> = ublk_sys::HEADER_PARAM_TYPES.iter().map(|(n, _)| *n).collect();
    println!("param_types {}: {}", pt.len(), pt.join(","));
}
