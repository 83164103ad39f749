//! The request head parser on arbitrary bytes: it never panics, every range
//! it returns lies inside the input, and an accepted head rewritten for the
//! upstream parses again with the same method, target (in origin form),
//! host and body framing.
#![no_main]

use corral::http::request::{parse_request, HeadLimits, RequestHead};
use corral::http::rewrite::{write_upstream_request, Forwarded};
use libfuzzer_sys::fuzz_target;

const LIMITS: HeadLimits = HeadLimits {
    max_header_bytes: 8192,
    max_headers: 64,
    max_uri_bytes: 4096,
};

fuzz_target!(|data: &[u8]| {
    let mut head = RequestHead::default();
    let Ok(true) = parse_request(data, &LIMITS, &mut head) else {
        return;
    };
    assert!(head.head_len <= data.len());
    for f in &head.fields {
        let _ = f.name(data);
        let _ = f.value(data);
    }
    let _ = head.path(data);
    let _ = head.host(data);
    let mut out = Vec::new();
    write_upstream_request(
        &mut out,
        data,
        &head,
        &Forwarded {
            client_ip: "127.0.0.1",
            proto: "http",
            backend_host: "127.0.0.1:1",
        },
    );
    let mut again = RequestHead::default();
    let big = HeadLimits {
        max_header_bytes: 1 << 20,
        max_headers: 256,
        max_uri_bytes: 1 << 20,
    };
    match parse_request(&out, &big, &mut again) {
        Ok(true) => {}
        other => panic!("rewritten head did not parse: {other:?}"),
    }
    assert_eq!(again.head_len, out.len());
    assert_eq!(again.method(), head.method());
    // Forwarded in origin form (an absolute-form target's authority goes in
    // Host, RFC 9112 §3.2.2), for the same host.
    let mut want = head.origin_target(data).to_vec();
    if want.first() == Some(&b'?') {
        want.insert(0, b'/');
    }
    assert_eq!(again.target(&out), &want[..]);
    if head.origin_form.is_some() {
        assert_eq!(again.host(&out), head.host(data));
    }
    assert_eq!(again.body(), head.body());
});
