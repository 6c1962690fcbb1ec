//! One library call against the real driver, for the unprivileged-device
//! tests (`tests/tests/unpriv.rs`), which run it as an ordinary user. Prints
//! one line, `ok DETAIL` or `err errno=N MESSAGE` (N is 0 for an error
//! without an errno), and exits 0 either way (2 on a usage error). Not for
//! use outside the tests.
//!
//! ```text
//! ublk-probe open PATH rw|ro          open(2) a node
//! ublk-probe info|params|set-params|stop|del|start-recovery|affinity|del-async ID
//! ublk-probe recover ID               Device::recover (waits 5 s at most)
//! ublk-probe raw-path CMD ID PATH     STOP_DEV or DEL_DEV for ID carrying PATH as the device path
//! ublk-probe raw-nopath CMD ID        STOP_DEV or DEL_DEV for ID without a path
//! ublk-probe add-raw FLAGS            ADD_DEV with FLAGS (hex); prints the flags the kernel
//!                                     returned, then deletes the device
//! ublk-probe create [unprivileged] [FLAGS]
//!                                     DeviceBuilder::create (a 16 MiB device), then drops it
//! ```

use std::time::Duration;

use ublk::{sys, Control, DevInfo, DeviceBuilder, Params};

fn errno_of(e: &ublk::Error) -> i32 {
    e.errno().unwrap_or(0)
}

fn report<T>(r: ublk::Result<T>, ok: impl FnOnce(T) -> String) {
    match r {
        Ok(v) => println!("ok {}", ok(v)),
        Err(e) => println!("err errno={} {e}", errno_of(&e)),
    }
}

fn usage() -> ! {
    eprintln!("ublk-probe: bad arguments; see the source's doc comment");
    std::process::exit(2)
}

fn op(name: &str) -> (&'static str, u32, u32) {
    match name {
        "STOP_DEV" => ("STOP_DEV", sys::UBLK_CMD_STOP_DEV, sys::UBLK_U_CMD_STOP_DEV),
        "DEL_DEV" => ("DEL_DEV", sys::UBLK_CMD_DEL_DEV, sys::UBLK_U_CMD_DEL_DEV),
        _ => usage(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or_else(|| usage());
    let id = |i: usize| a(i).parse::<u32>().unwrap_or_else(|_| usage());
    let ctrl = || Control::open();
    match a(0) {
        "open" => {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(a(2) == "rw");
            match o.open(a(1)) {
                Ok(_) => println!("ok opened"),
                Err(e) => println!("err errno={} {e}", e.raw_os_error().unwrap_or(0)),
            }
        }
        "info" => report(ctrl().and_then(|mut c| c.get_dev_info(id(1))), |i| {
            let (u, g) = i.owner().unwrap_or((u32::MAX, u32::MAX));
            format!("state={} owner={u}:{g} flags={:#x} pid={}", ublk::ctrl::state_name(i.state), i.flags, i.ublksrv_pid)
        }),
        "params" => report(ctrl().and_then(|mut c| c.get_params(id(1))), |p| format!("sectors={}", p.basic.dev_sectors)),
        "set-params" => report(
            ctrl().and_then(|mut c| {
                let p = Params::new(16 << 20, 512, 512 << 10)?;
                c.set_params(id(1), &p)
            }),
            |()| "set".into(),
        ),
        "stop" => report(ctrl().and_then(|mut c| c.stop_dev(id(1))), |()| "stopped".into()),
        "del" => report(ctrl().and_then(|mut c| c.del_dev(id(1))), |()| "deleted".into()),
        "del-async" => report(ctrl().and_then(|mut c| c.del_dev_async(id(1))), |()| "deleted".into()),
        "start-recovery" => report(ctrl().and_then(|mut c| c.start_user_recovery(id(1))), |()| "started".into()),
        "affinity" => report(ctrl().and_then(|mut c| c.get_queue_affinity(id(1), 0)), |cpus| format!("cpus={cpus:?}")),
        "recover" => report(DeviceBuilder::new().recover(id(1), Duration::from_secs(5)), |d| {
            let id = d.id();
            d.leak();
            format!("took over device {id}")
        }),
        "raw-path" => {
            let (name, legacy, encoded) = op(a(1));
            report(ctrl().and_then(|mut c| c.raw_command_with_path(name, legacy, encoded, id(2), a(3))), |r| format!("res={r}"));
        }
        "raw-nopath" => {
            let (name, legacy, encoded) = op(a(1));
            let cmd = sys::ublksrv_ctrl_cmd { dev_id: id(2), queue_id: u16::MAX, ..Default::default() };
            report(ctrl().and_then(|mut c| c.raw_command(name, legacy, encoded, cmd)), |r| format!("res={r}"));
        }
        "add-raw" => {
            let flags = u64::from_str_radix(a(1).trim_start_matches("0x"), 16).unwrap_or_else(|_| usage());
            let info =
                DevInfo { nr_hw_queues: 1, queue_depth: 16, max_io_buf_bytes: 512 << 10, dev_id: u32::MAX, flags, ..Default::default() };
            let r = ctrl().and_then(|mut c| {
                let out = c.add_dev(&info)?;
                // Deleting needs the node, which the udev rule gives the owner.
                let t0 = std::time::Instant::now();
                loop {
                    match c.del_dev(out.dev_id) {
                        Ok(()) => break,
                        Err(e) if t0.elapsed() > Duration::from_secs(10) => return Err(e),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                Ok(out)
            });
            report(r, |out| format!("id={} flags={:#x} deleted", out.dev_id, out.flags));
        }
        "create" => {
            let mut b = DeviceBuilder::new().size(16 << 20).depth(16);
            let mut rest = &args[1..];
            if rest.first().map(String::as_str) == Some("unprivileged") {
                b = b.unprivileged();
                rest = &rest[1..];
            }
            if let Some(f) = rest.first() {
                b = b.flags(u64::from_str_radix(f.trim_start_matches("0x"), 16).unwrap_or_else(|_| usage()));
            }
            report(b.create(), |d| format!("created device {} flags={:#x}", d.id(), d.info().flags));
        }
        _ => usage(),
    }
}
