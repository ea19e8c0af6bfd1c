//! The sample driver through its plain `VfioDriver` API: migration round
//! trips while the state keeps changing, refusals, interrupts.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use dmhost_plugin_api::{
    vfio::{
        errno, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
        VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_PCI_MSI_IRQ_INDEX,
    },
    MigState, VfioDataStream, VfioDriver,
};
use vfio_vendor_sample::{
    config::SampleConfig,
    device::{
        SampleDevice, CONTROL_IRQ_ENABLE, EXP_CAP, EXP_DEVCAP_FLR, EXP_DEVCTL_BCR_FLR, MSIX_CAP,
        MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS, MSI_CAP, REG_CONTROL, REG_DIGEST, REG_DOORBELL,
        REG_SCRATCH, REG_STATUS,
    },
};

fn dev(cfg: &str) -> SampleDevice {
    SampleDevice::new(SampleConfig::parse(cfg).unwrap())
}

fn go(d: &SampleDevice, s: MigState) -> Option<VfioDataStream> {
    d.set_state(s.raw()).unwrap_or_else(|e| panic!("-> {s}: {e}"))
}

fn state(d: &SampleDevice) -> MigState {
    MigState::from_raw(d.get_state()).unwrap()
}

fn read_all(d: &SampleDevice, s: VfioDataStream, chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        match d.read_migration_data(s, &mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("stop-copy read: {e}"),
        }
    }
}

fn write_all(d: &SampleDevice, s: VfioDataStream, data: &[u8], chunk: usize) {
    for c in data.chunks(chunk) {
        assert_eq!(d.write_migration_data(s, c).unwrap(), c.len());
    }
}

fn to_resuming(d: &SampleDevice) -> VfioDataStream {
    go(d, MigState::RunningP2p);
    go(d, MigState::Stop);
    go(d, MigState::Resuming).expect("RESUMING opens a session")
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain eventfd creation; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn eventfd_count(fd: &OwnedFd) -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: 8-byte read into a live buffer from an fd we own.
    let r = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    if r == 8 {
        u64::from_ne_bytes(b)
    } else {
        0
    }
}

/// Pre-copy while the background thread keeps dirtying pages, then
/// stop-copy, then resume on a second instance: identical state.
#[test]
fn precopy_round_trip_while_state_changes() {
    let cfg = r#"{"state-size":"2M","dirty-pages-per-tick":4,"tick-us":200}"#;
    let src = dev(cfg);
    let dst = dev(cfg);
    src.region_write(0, REG_SCRATCH, &0xfeed_f00du32.to_le_bytes()).unwrap();

    let s = go(&src, MigState::PreCopy).expect("PRE_COPY opens a session");
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let (mut last_initial, mut saw_dirty, mut saw_enomsg) = (u64::MAX, false, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !(saw_dirty && saw_enomsg && last_initial == 0) {
        let info = src.precopy_info(s).unwrap();
        assert!(info.initial_bytes <= last_initial, "initial_bytes grew: {info:?}");
        assert!(info.initial_bytes < 1 << 40 && info.dirty_bytes < 1 << 40, "{info:?}");
        last_initial = info.initial_bytes;
        saw_dirty |= info.initial_bytes == 0 && info.dirty_bytes > 0;
        match src.read_migration_data(s, &mut buf) {
            Ok(n) => {
                assert!(n > 0, "PRE_COPY read returned 0 (EOF) instead of ENOMSG");
                stream.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.is_no_data() => {
                saw_enomsg = true;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("pre-copy read: {e}"),
        }
    }
    assert!(
        saw_dirty && saw_enomsg && last_initial == 0,
        "dirty {saw_dirty} enomsg {saw_enomsg} initial {last_initial}"
    );

    // Stop: PRE_COPY -> PRE_COPY_P2P -> STOP_COPY keeps the session.
    assert_eq!(go(&src, MigState::PreCopyP2p), None);
    assert_eq!(go(&src, MigState::StopCopy), None);
    let size = src.stop_copy_size().unwrap();
    let rest = read_all(&src, s, 10_000);
    assert_eq!(rest.len() as u64, size, "stop_copy_size was exact");
    assert_eq!(src.read_migration_data(s, &mut buf).unwrap(), 0, "EOF persists");
    stream.extend_from_slice(&rest);

    let r = to_resuming(&dst);
    write_all(&dst, r, &stream, 4093);
    go(&dst, MigState::Stop);
    assert_eq!(src.snapshot(), dst.snapshot(), "internal state and registers identical");
    assert_eq!(src.state_digest(), dst.state_digest());

    // The destination runs on and changes state again.
    go(&dst, MigState::RunningP2p);
    go(&dst, MigState::Running);
    let mut d = [0u8; 4];
    dst.region_read(0, REG_SCRATCH, &mut d).unwrap();
    assert_eq!(u32::from_le_bytes(d), 0xfeed_f00d);
    std::thread::sleep(Duration::from_millis(20));
    assert_ne!(src.state_digest(), dst.state_digest());
}

/// STOP -> STOP_COPY alone gives the whole state; the stream is
/// deterministic, and a second device loads it.
#[test]
fn stop_copy_only_is_deterministic() {
    let cfg = r#"{"state-size":"256K","background":false}"#;
    let src = dev(cfg);
    for i in 0..10 {
        src.touch(i * 7);
    }
    go(&src, MigState::RunningP2p);
    go(&src, MigState::Stop);
    let s1 = go(&src, MigState::StopCopy).unwrap();
    let a = read_all(&src, s1, 1 << 20);
    go(&src, MigState::Stop);
    let s2 = go(&src, MigState::StopCopy).unwrap();
    assert_ne!(s1, s2, "a new session has a new stream id");
    assert!(src.read_migration_data(s1, &mut [0u8; 8]).is_err(), "stale stream refused");
    let b = read_all(&src, s2, 4096);
    assert_eq!(a, b);

    let dst = dev(cfg);
    let r = to_resuming(&dst);
    write_all(&dst, r, &a, 1);
    go(&dst, MigState::Stop);
    assert_eq!(src.snapshot(), dst.snapshot());
}

#[test]
fn truncated_or_corrupt_stream_fails_resume_and_reset_recovers() {
    let cfg = r#"{"state-size":"64K","background":false}"#;
    let src = dev(cfg);
    go(&src, MigState::RunningP2p);
    go(&src, MigState::Stop);
    let s = go(&src, MigState::StopCopy).unwrap();
    let full = read_all(&src, s, 1 << 16);

    let truncated = dev(cfg);
    let r = to_resuming(&truncated);
    write_all(&truncated, r, &full[..full.len() - 5], 1000);
    let e = truncated.set_state(MigState::Stop.raw()).unwrap_err();
    assert_eq!(e.errno, errno::EINVAL, "{e}");
    assert_eq!(state(&truncated), MigState::Error);
    assert!(truncated.set_state(MigState::Running.raw()).is_err(), "ERROR has no arcs");
    truncated.reset().unwrap();
    assert_eq!(state(&truncated), MigState::Running);

    let mut bad = full.clone();
    bad[24 + 8 + 200] ^= 0x40; // inside the first page
    let corrupt = dev(cfg);
    let r = to_resuming(&corrupt);
    assert!(corrupt.write_migration_data(r, &bad).is_err());
    assert!(corrupt.write_migration_data(r, &full).is_err(), "session stays poisoned");
    assert!(corrupt.set_state(MigState::Stop.raw()).is_err());

    let extra = dev(cfg);
    let r = to_resuming(&extra);
    let mut longer = full.clone();
    longer.push(0);
    assert!(extra.write_migration_data(r, &longer).is_err(), "data after END refused");

    // Geometry mismatch: a 128K stream into a 64K device.
    let big = dev(r#"{"state-size":"128K","background":false}"#);
    go(&big, MigState::RunningP2p);
    go(&big, MigState::Stop);
    let s = go(&big, MigState::StopCopy).unwrap();
    let other = read_all(&big, s, 1 << 16);
    let small = dev(cfg);
    let r = to_resuming(&small);
    let e = small.write_migration_data(r, &other).unwrap_err();
    assert!(e.message.contains("pages"), "{e}");
}

#[test]
fn refusals_in_wrong_states() {
    let d = dev(r#"{"state-size":"64K","background":false}"#);
    let fake = VfioDataStream { id: 99 };
    let mut buf = [0u8; 16];
    assert_eq!(d.read_migration_data(fake, &mut buf).unwrap_err().errno, errno::EBADF);
    assert!(d.precopy_info(fake).is_err());
    assert!(d.write_migration_data(fake, &buf).is_err());
    assert!(d.set_state(MigState::StopCopy.raw()).is_err(), "RUNNING -> STOP_COPY is not one arc");
    assert!(d.set_state(MigState::Error.raw()).is_err());
    assert!(d.set_state(42).is_err());
    assert_eq!(state(&d), MigState::Running);

    let s = go(&d, MigState::PreCopy).unwrap();
    assert!(d.write_migration_data(s, &buf).is_err(), "no writes while saving");
    go(&d, MigState::PreCopyP2p);
    go(&d, MigState::StopCopy);
    assert!(d.precopy_info(s).is_err(), "precopy info only in PRE_COPY states");
    let e = d.set_state(MigState::PreCopy.raw()).unwrap_err();
    assert_eq!(e.errno, errno::EINVAL);
    assert!(d.set_state(MigState::PreCopyP2p.raw()).is_err(), "STOP_COPY -> PRE_COPY_P2P refused");
    assert_eq!(state(&d), MigState::StopCopy);
    assert!(d.region_write(0, REG_SCRATCH, &[1, 0, 0, 0]).is_err(), "stopped device refuses BAR writes");
    go(&d, MigState::Stop);
    assert_eq!(d.read_migration_data(s, &mut buf).unwrap_err().errno, errno::EBADF, "session closed");
    let r = go(&d, MigState::Resuming).unwrap();
    assert!(d.read_migration_data(r, &mut buf).is_err(), "no reads while resuming");
    go(&d, MigState::Stop); // nothing written: state kept
    assert_eq!(state(&d), MigState::Stop);

    // Out-of-range region access.
    assert!(d.region_read(0, 4095, &mut buf[..4]).is_err());
    assert!(d.region_read(0, u64::MAX, &mut buf[..1]).is_err());
    assert!(d.region_read(12, 0, &mut buf[..1]).is_err());
    assert!(d.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 250, &[0; 8]).is_err());
}

#[test]
fn doorbell_raises_intx_then_msi() {
    let d = dev(r#"{"state-size":"64K","background":true,"tick-us":100}"#);
    let trigger = eventfd();
    let unmask = eventfd();
    d.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[trigger.as_raw_fd()]).unwrap();
    d.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_UNMASK, 0, &[unmask.as_raw_fd()]).unwrap();
    d.region_write(0, REG_CONTROL, &CONTROL_IRQ_ENABLE.to_le_bytes()).unwrap();
    d.region_write(0, REG_DOORBELL, &[1, 0, 0, 0]).unwrap();
    assert_eq!(eventfd_count(&trigger), 1, "INTx fired");
    d.region_write(0, REG_DOORBELL, &[1, 0, 0, 0]).unwrap();
    assert_eq!(eventfd_count(&trigger), 0, "automasked until unmask");
    // Guest EOI: the host signals the resample fd; still pending -> fires again.
    // SAFETY: 8-byte write from a live buffer to our eventfd.
    unsafe { libc::write(unmask.as_raw_fd(), 1u64.to_ne_bytes().as_ptr().cast(), 8) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fired = 0;
    while fired == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        fired = eventfd_count(&trigger);
    }
    assert_eq!(fired, 1, "level re-asserted after unmask");
    d.region_write(0, REG_STATUS, &1u32.to_le_bytes()).unwrap();

    // MSI: enable in config space and give it an eventfd.
    let msi = eventfd();
    d.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[msi.as_raw_fd()]).unwrap();
    d.region_write(VFIO_PCI_CONFIG_REGION_INDEX, (MSI_CAP + 2) as u64, &[1]).unwrap();
    d.region_write(0, REG_DOORBELL, &[1, 0, 0, 0]).unwrap();
    assert_eq!(eventfd_count(&msi), 1);
    assert_eq!(eventfd_count(&trigger), 0);
    assert!(d.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 1, &[msi.as_raw_fd()]).is_err());
    assert!(d.set_irqs(7, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[]).is_err());

    let mut lo = [0u8; 8];
    d.region_read(0, REG_DIGEST, &mut lo).unwrap();
    let _ = d.state_digest();
}

#[test]
fn doorbell_fires_the_msix_vector_it_names() {
    let d = dev(r#"{"state-size":"64K","background":false}"#);
    let info = d.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!(info.count, MSIX_VECTORS as u32);
    const { assert!(MSIX_VECTORS >= 2) };
    // The capability names the table and PBA in BAR0.
    let mut cap = [0u8; 12];
    d.region_read(VFIO_PCI_CONFIG_REGION_INDEX, MSIX_CAP as u64, &mut cap).unwrap();
    assert_eq!(cap[0], 0x11);
    assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), MSIX_VECTORS as u16 - 1);
    assert_eq!(u32::from_le_bytes([cap[4], cap[5], cap[6], cap[7]]), MSIX_TABLE_OFFSET);
    assert_eq!(u32::from_le_bytes([cap[8], cap[9], cap[10], cap[11]]), MSIX_PBA_OFFSET);

    let (v0, v1, msi) = (eventfd(), eventfd(), eventfd());
    d.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[msi.as_raw_fd()]).unwrap();
    d.region_write(VFIO_PCI_CONFIG_REGION_INDEX, (MSI_CAP + 2) as u64, &[1]).unwrap();
    d.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 1, &[v1.as_raw_fd()]).unwrap();
    d.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[v0.as_raw_fd()]).unwrap();
    d.region_write(0, REG_CONTROL, &CONTROL_IRQ_ENABLE.to_le_bytes()).unwrap();
    d.region_write(0, REG_DOORBELL, &0u32.to_le_bytes()).unwrap();
    assert_eq!((eventfd_count(&msi), eventfd_count(&v0)), (1, 0), "MSI-X off: MSI");
    // Enable MSI-X (control bit 15): it wins over MSI.
    d.region_write(VFIO_PCI_CONFIG_REGION_INDEX, (MSIX_CAP + 3) as u64, &[0x80]).unwrap();
    d.region_write(0, REG_DOORBELL, &0u32.to_le_bytes()).unwrap();
    d.region_write(0, REG_DOORBELL, &1u32.to_le_bytes()).unwrap();
    d.region_write(0, REG_DOORBELL, &3u32.to_le_bytes()).unwrap();
    assert_eq!((eventfd_count(&v0), eventfd_count(&v1), eventfd_count(&msi)), (1, 2, 0));
    // The table range reads as zeros on the device side.
    let mut t = [0xffu8; 4];
    d.region_read(0, u64::from(MSIX_TABLE_OFFSET), &mut t).unwrap();
    assert_eq!(t, [0; 4]);
    // Release vector 1 alone, then every vector.
    d.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 1, &[-1]).unwrap();
    d.region_write(0, REG_DOORBELL, &1u32.to_le_bytes()).unwrap();
    d.region_write(0, REG_DOORBELL, &0u32.to_le_bytes()).unwrap();
    assert_eq!((eventfd_count(&v0), eventfd_count(&v1)), (1, 0));
    d.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[]).unwrap();
    d.region_write(0, REG_DOORBELL, &0u32.to_le_bytes()).unwrap();
    assert_eq!(eventfd_count(&v0), 0);
    // Out of range, and bad descriptors.
    let n = MSIX_VECTORS as u32;
    assert!(d.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, n, &[v0.as_raw_fd()]).is_err());
    assert!(d.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, u32::MAX, &[-1]).is_err());
    assert!(d.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[-1, -1, -1]).is_err());
    assert!(d.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_MASK, 0, &[]).is_err());
}

#[test]
fn flr_through_config_space_resets_registers_and_config() {
    let d = dev(r#"{"state-size":"64K","background":false}"#);
    let mut cap = [0u8; 12];
    d.region_read(VFIO_PCI_CONFIG_REGION_INDEX, EXP_CAP as u64, &mut cap).unwrap();
    assert_eq!(cap[0], 0x10, "PCI Express capability");
    let mut next = [0u8];
    d.region_read(VFIO_PCI_CONFIG_REGION_INDEX, MSIX_CAP as u64 + 1, &mut next).unwrap();
    assert_eq!(next[0] as usize, EXP_CAP, "appended after MSI-X");
    assert_eq!(u32::from_le_bytes([cap[4], cap[5], cap[6], cap[7]]) & EXP_DEVCAP_FLR, EXP_DEVCAP_FLR);
    let devctl = u16::from_le_bytes([cap[8], cap[9]]);
    assert_eq!(devctl & EXP_DEVCTL_BCR_FLR, 0);

    d.region_write(0, REG_SCRATCH, &0x1234_5678u32.to_le_bytes()).unwrap();
    d.region_write(0, REG_CONTROL, &CONTROL_IRQ_ENABLE.to_le_bytes()).unwrap();
    d.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &[0x02]).unwrap();
    // Other DevCtl bits: no reset.
    d.region_write(VFIO_PCI_CONFIG_REGION_INDEX, EXP_CAP as u64 + 8, &0x7fffu16.to_le_bytes()).unwrap();
    assert_eq!(d.resets(), 0);
    d.region_write(VFIO_PCI_CONFIG_REGION_INDEX, EXP_CAP as u64 + 8, &EXP_DEVCTL_BCR_FLR.to_le_bytes())
        .unwrap();
    assert_eq!(d.resets(), 1);
    let mut v = [0u8; 4];
    d.region_read(0, REG_SCRATCH, &mut v).unwrap();
    assert_eq!(v, [0; 4], "scratch back to 0");
    d.region_read(0, REG_CONTROL, &mut v).unwrap();
    assert_eq!(v, [0; 4]);
    let mut after = [0u8; 12];
    d.region_read(VFIO_PCI_CONFIG_REGION_INDEX, EXP_CAP as u64, &mut after).unwrap();
    assert_eq!(after, cap, "DevCtl reads back its default, FLR bit 0");
    d.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &mut v[..2]).unwrap();
    assert_eq!(v[..2], [0, 0], "command cleared");
    d.reset().unwrap();
    assert_eq!(d.resets(), 2, "VFIO_DEVICE_RESET counts too");
}
