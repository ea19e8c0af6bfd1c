//! The source in post-copy: the guest is stopped here for good; requested
//! pages go out first on the urgent connection, the rest streams on the
//! main one; a broken connection pauses until `migrate {resume: true}`.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::vm::ramblocks::RamBlock;

use super::{
    retpath::{RetMsg, RetPathError},
    AtomicBitmap,
};
use crate::migration::{
    connect,
    machine::block_bytes,
    progress::{Progress, Resume, Status},
    source::MigrationError,
    ConfigSection, MigrationStream, MigrationUri, StreamWriter, PAGE_SIZE,
};

/// Background pages per RAM section: small, so the main stream stays
/// responsive to cancellation and breaks.
const BACKGROUND_BATCH: usize = 64;
/// How long the source waits for the destination's readiness and for its
/// answer after a reconnection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// One RAM block in post-copy on the source.
pub struct PcBlock {
    pub block: RamBlock,
    /// Every page the destination still needed when post-copy began.
    pub pending: Vec<u64>,
    /// Pages not sent yet on this connection.
    pub unsent: AtomicBitmap,
}

/// The connections of one post-copy session.
pub struct Session {
    pub main: StreamWriter<MigrationStream>,
    pub ret: MigrationStream,
    pub urgent: StreamWriter<MigrationStream>,
}

enum Event {
    Complete,
    Broken(String),
}

/// Open the urgent-page connection: a stream of its own (header,
/// configuration, RAM sections, end).
pub fn connect_urgent(
    uri: &MigrationUri,
    config: &ConfigSection,
) -> Result<StreamWriter<MigrationStream>, MigrationError> {
    let s = connect(uri)?;
    s.set_nodelay();
    let mut w = StreamWriter::with_capacity(64 << 10, s)?;
    w.write_config(config)?;
    w.flush()?;
    Ok(w)
}

/// Run post-copy to the end: every pending page reaches the destination.
/// The guest stays stopped whatever happens.
pub fn run(
    blocks: &[PcBlock],
    config: &ConfigSection,
    mut session: Session,
    progress: &Progress,
) -> Result<u64, MigrationError> {
    let resume = progress.resume_channel();
    let requests = AtomicU64::new(0);
    loop {
        progress.set_status(Status::PostcopyActive);
        match run_session(blocks, config, session, progress, &requests) {
            Ok(()) => return Ok(requests.load(Ordering::Relaxed)),
            Err(MigrationError::Cancelled) => return Err(MigrationError::Cancelled),
            Err(e) => {
                log::warn!(
                    "migration: post-copy connection lost ({e}); paused, waiting for `migrate` with resume"
                );
                progress.set_status(Status::PostcopyPaused);
                progress.set_extra("postcopy-paused-reason", serde_json::json!(e.to_string()));
            }
        }
        session = loop {
            let uri = loop {
                match resume.recv_timeout(Duration::from_millis(100)) {
                    Ok(Resume::Connect(uri)) => break uri,
                    Ok(Resume::Accept(_)) => continue,
                    Err(mpsc::RecvTimeoutError::Timeout) if progress.cancelled() => {
                        return Err(MigrationError::Cancelled)
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Err(MigrationError::Cancelled),
                }
            };
            match reconnect(blocks, config, &uri) {
                Ok(s) => break s,
                Err(e) => {
                    log::warn!("migration: post-copy resume to {uri} failed: {e}; still paused");
                    progress.set_extra(
                        "postcopy-paused-reason",
                        serde_json::json!(format!("resume failed: {e}")),
                    );
                    progress.set_status(Status::PostcopyPaused);
                }
            }
        };
    }
}

/// A new connection resuming post-copy: the destination says which pages
/// it has; the others are sent again.
fn reconnect(
    blocks: &[PcBlock],
    config: &ConfigSection,
    uri: &MigrationUri,
) -> Result<Session, MigrationError> {
    let stream = connect(uri)?;
    let mut ret = stream.try_clone()?;
    let mut main = StreamWriter::new(stream)?;
    main.write_config(config)?;
    main.write_postcopy_resume()?;
    ret.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut got = 0;
    loop {
        match RetMsg::read(&mut ret, config).map_err(ret_err)? {
            RetMsg::Received { block, bitmap } => {
                let b = blocks.iter().find(|b| b.block.name == block).ok_or_else(|| {
                    MigrationError::Incoming(format!("received bitmap of unknown block {block:?}"))
                })?;
                let unsent: Vec<u64> = b.pending.iter().zip(&bitmap).map(|(p, r)| p & !r).collect();
                b.unsent.store_words(&unsent);
                got += 1;
            }
            RetMsg::ResumeReady => break,
            other => return Err(MigrationError::Incoming(format!("unexpected {other:?} while resuming"))),
        }
    }
    if got != blocks.len() {
        return Err(MigrationError::Incoming(format!(
            "the destination sent {got} bitmaps for {} blocks",
            blocks.len()
        )));
    }
    ret.set_read_timeout(None);
    let left: u64 = blocks.iter().map(|b| b.unsent.count()).sum();
    log::info!("migration: post-copy resumed to {uri}: {left} pages left to send");
    let urgent = connect_urgent(uri, config)?;
    Ok(Session { main, ret, urgent })
}

fn ret_err(e: RetPathError) -> MigrationError {
    match e {
        RetPathError::Remote(m) => MigrationError::Refused(m),
        e => MigrationError::NoAck(e.to_string()),
    }
}

fn run_session(
    blocks: &[PcBlock],
    config: &ConfigSection,
    session: Session,
    progress: &Progress,
    requests: &AtomicU64,
) -> Result<(), MigrationError> {
    let Session { mut main, mut ret, urgent } = session;
    let mut handles = Vec::new();
    for s in [main.get_ref(), &ret, urgent.get_ref()] {
        if let Ok(c) = s.try_clone() {
            handles.push(c);
        }
    }
    progress.set_sockets(handles);
    let (ev_tx, ev_rx) = mpsc::channel::<Event>();
    // The return-path thread writes requested pages itself: a hand-over to
    // another thread cost a wake-up (tens of µs here) per fault. `None`
    // once the end section is written.
    let urgent = Mutex::new(Some(urgent));
    let result = std::thread::scope(|scope| {
        let tx = ev_tx.clone();
        let urgent = &urgent;
        let rp =
            std::thread::Builder::new().name("postcopy-retpath".into()).spawn_scoped(scope, move || loop {
                let broken = match RetMsg::read(&mut ret, config) {
                    Ok(RetMsg::Request { block, pages }) => {
                        let Some(b) = blocks.iter().find(|b| b.block.name == block) else { continue };
                        match serve(urgent, b, &pages, requests) {
                            Ok(()) => continue,
                            Err(e) => format!("urgent channel: {e}"),
                        }
                    }
                    Ok(RetMsg::Complete) => {
                        let _ = tx.send(Event::Complete);
                        return;
                    }
                    Ok(other) => format!("unexpected return-path message {other:?}"),
                    Err(e) => format!("return path: {e}"),
                };
                let _ = tx.send(Event::Broken(broken));
                return;
            });
        let r = background(blocks, &mut main, progress, requests, &ev_rx).and_then(|()| {
            match lock(urgent).take() {
                Some(mut u) => Ok(u.write_end()?),
                None => Ok(()),
            }
        });
        let r = match r {
            Ok(()) => loop {
                // Everything is sent: wait for the destination's word.
                match ev_rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(Event::Complete) => break Ok(()),
                    Ok(Event::Broken(e)) => break Err(MigrationError::NoAck(e)),
                    Err(_) if progress.cancelled() => break Err(MigrationError::Cancelled),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        break Err(MigrationError::NoAck("return path gone".into()))
                    }
                }
            },
            Err(e) => Err(e),
        };
        // Unblock every thread of this session.
        progress.break_sockets();
        let _ = rp.map(|h| h.join());
        r
    });
    progress.set_sockets(Vec::new());
    result
}

/// Stream every unsent page on the main connection, then its end section.
fn background(
    blocks: &[PcBlock],
    main: &mut StreamWriter<MigrationStream>,
    progress: &Progress,
    requests: &AtomicU64,
    events: &mpsc::Receiver<Event>,
) -> Result<(), MigrationError> {
    let mut pages = Vec::with_capacity(BACKGROUND_BATCH);
    let mut window = (0u64, Instant::now());
    let mut last_report = Instant::now();
    for b in blocks {
        let mut cursor = 0;
        loop {
            if progress.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            match events.try_recv() {
                Ok(Event::Broken(e)) => return Err(MigrationError::NoAck(e)),
                Ok(Event::Complete) => {
                    return Err(MigrationError::Incoming(
                        "the destination completed before every page was sent".into(),
                    ))
                }
                Err(_) => {}
            }
            b.unsent.take_next(&mut cursor, BACKGROUND_BATCH, &mut pages);
            if pages.is_empty() {
                break;
            }
            // SAFETY: the guest is stopped for good; the block stays registered.
            let mem = unsafe { block_bytes(&b.block) };
            let st = main.write_ram_pages(&b.block.name, mem, &pages)?;
            window.0 += st.bytes;
            let transferred = main.bytes_written();
            progress.update(|s| {
                s.transferred = transferred;
                s.pages_sent += st.pages - st.zero_pages;
                s.zero_pages += st.zero_pages;
            });
            if last_report.elapsed() > Duration::from_millis(100) {
                last_report = Instant::now();
                report(blocks, progress, requests);
            }
            let limit = progress.params().max_postcopy_bandwidth;
            if limit > 0 {
                let due = Duration::from_secs_f64(window.0 as f64 / limit as f64);
                let elapsed = window.1.elapsed();
                if due > elapsed {
                    std::thread::sleep(due - elapsed);
                }
                if elapsed > Duration::from_secs(1) {
                    window = (0, Instant::now());
                }
            }
        }
    }
    main.write_end()?;
    report(blocks, progress, requests);
    log::info!("migration: post-copy sent every page ({} requested)", requests.load(Ordering::Relaxed));
    Ok(())
}

/// Send requested `pages` of `b` on the urgent connection at once, unless
/// it has ended (every page went on the main stream then).
fn serve(
    urgent: &Mutex<Option<StreamWriter<MigrationStream>>>,
    b: &PcBlock,
    pages: &[u64],
    requests: &AtomicU64,
) -> Result<(), MigrationError> {
    let mut guard = lock(urgent);
    let Some(w) = guard.as_mut() else { return Ok(()) };
    for &p in pages {
        b.unsent.clear(p);
    }
    // SAFETY: the guest is stopped for good on this side and the block
    // stays registered.
    let mem = unsafe { block_bytes(&b.block) };
    w.write_ram_pages(&b.block.name, mem, pages)?;
    w.flush()?;
    requests.fetch_add(pages.len() as u64, Ordering::Relaxed);
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn report(blocks: &[PcBlock], progress: &Progress, requests: &AtomicU64) {
    let left: u64 = blocks.iter().map(|b| b.unsent.count()).sum();
    progress.update(|s| s.remaining = left * PAGE_SIZE as u64);
    progress.set_extra(
        "postcopy",
        serde_json::json!({
            "postcopy-requests": requests.load(Ordering::Relaxed),
            "pages-remaining": left,
        }),
    );
}
