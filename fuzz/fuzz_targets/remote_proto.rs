//! Arbitrary bytes into the device-process protocol decoders, as one
//! packet of either socket: a request (the host's I/O requests in the
//! device process, the device's service requests and log records in the
//! host), a reply (the host reads the device's), the first part of a big
//! reply, a log record's payload and the memory region reply. Every
//! decoder returns an error or a value within its limits, never panics;
//! what is accepted encodes back.
#![no_main]

use dmhost::{
    migration::MAX_DEVICE_DATA,
    remote::{
        proto::{
            decode_big, decode_log, decode_reply, encode_reply, Op, RegionReply, Request, MAX_DATA, MAX_LOG,
            MAX_LOG_TARGET,
        },
        proxy::MAX_ACPI,
    },
};
use libfuzzer_sys::fuzz_target;

fn check_log(payload: &[u8]) {
    let (target, message) = decode_log(payload);
    assert!(target.chars().count() <= MAX_LOG_TARGET && message.chars().count() <= MAX_LOG);
    assert!(!target.chars().chain(message.chars()).any(char::is_control));
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::decode(data) {
        assert_eq!(req.encode(), data);
        if let Ok(n) = req.len_arg(MAX_DATA) {
            assert!(n <= MAX_DATA);
        }
        if req.op == Op::Log {
            check_log(&req.payload);
        }
    }
    match decode_reply(data) {
        Ok(Ok(d)) => assert_eq!(encode_reply(&Ok(d)), data),
        Ok(Err(e)) => {
            let again = decode_reply(&encode_reply(&Err(e.clone()))).expect("an encoded error decodes");
            assert_eq!(again.map_err(|a| a.kind), Err(e.kind));
        }
        Err(_) => {}
    }
    for limit in [0, MAX_ACPI, MAX_DEVICE_DATA as usize] {
        if let Ok((total, _, first)) = decode_big(data, limit) {
            assert!(first.len() <= total && total <= limit);
        }
    }
    check_log(data);
    if let Ok(r) = RegionReply::decode(data) {
        assert_eq!(RegionReply::decode(&r.encode()).ok(), Some(r));
        let (offset, size) = r.mapping();
        assert!(
            offset <= r.fd_offset && r.fd_offset - offset <= size && r.size <= size - (r.fd_offset - offset)
        );
    }
});
