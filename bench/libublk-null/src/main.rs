//! A null target written against libublk's public API, in its sync style
//! (a per-queue io handler closure) or its async style (one smol task per
//! tag), for benchmarking ours against it. Usage:
//! `libublk-null sync|async QUEUES DEPTH`; prints the block device path when
//! live; SIGTERM/SIGINT stop and delete the device.

use std::rc::Rc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkFlags, UblkIORes};

fn bytes_of(q: &UblkQueue, tag: u16) -> i32 {
    (q.get_iod(tag).nr_sectors << 9) as i32
}

fn queue_sync(qid: u16, dev: &UblkDev) {
    let bufs = Rc::new(dev.alloc_queue_io_bufs());
    let b2 = bufs.clone();
    let handler = move |q: &UblkQueue, tag: u16, _ctx: &UblkIOCtx| {
        let res = bytes_of(q, tag);
        let _ = q.complete_io_cmd_unified(tag, BufDesc::Slice(b2[tag as usize].as_slice()), Ok(UblkIORes::Result(res)));
    };
    let q = UblkQueue::new(qid, dev).expect("queue").submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))).expect("fetch");
    q.wait_and_handle_io(handler);
}

async fn tag_task(q: &UblkQueue<'_>, tag: u16) -> Result<(), libublk::UblkError> {
    let buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    let desc = BufDesc::Slice(buf.as_slice());
    q.submit_io_prep_cmd(tag, desc.clone(), 0, Some(&buf)).await?;
    loop {
        let res = bytes_of(q, tag);
        q.submit_io_commit_cmd(tag, desc.clone(), res).await?;
    }
}

fn queue_async(qid: u16, dev: &UblkDev) {
    let q = Rc::new(UblkQueue::new(qid, dev).expect("queue"));
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in 0..dev.dev_info.queue_depth {
        let q = q.clone();
        tasks.push(exe.spawn(async move { tag_task(&q, tag).await }));
    }
    let e2 = exe.clone();
    smol::block_on(exe.run(async move {
        let tick = || while e2.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        let _ = libublk::wait_and_handle_io_events(&q, Some(20), tick, done).await;
    }));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("sync").to_string();
    let queues: u16 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let depth: u16 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(128);

    // SIGTERM/SIGINT go to a waiting thread that stops the device.
    // SAFETY: signal-mask manipulation on a local set for this thread (and
    // the threads spawned after it).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    let ctrl = UblkCtrlBuilder::default()
        .name("libublk-null")
        .nr_queues(queues)
        .depth(depth)
        .io_buf_bytes(512 << 10)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .expect("add device");
    let id = ctrl.dev_info().dev_id;
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: valid set and out-pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        if let Ok(c) = UblkCtrl::new_simple(id as i32) {
            let _ = c.kill_dev();
        }
    });
    let init = |dev: &mut UblkDev| {
        dev.set_default_params(250u64 << 30);
        Ok(())
    };
    let live = move |c: &UblkCtrl| {
        println!("{}", c.get_bdev_path());
        use std::io::Write;
        let _ = std::io::stdout().flush();
    };
    let r = if mode == "async" {
        ctrl.run_target(init, |q, d: &_| queue_async(q, d), live)
    } else {
        ctrl.run_target(init, |q, d: &_| queue_sync(q, d), live)
    };
    if let Err(e) = r {
        eprintln!("libublk-null: {e:?}");
    }
    let _ = ctrl.del_dev();
}
