//! Micro-benchmarks of the hot pure code: request head parsing, upstream
//! head rewriting, response head parsing and chunked decoding.
//! `cargo bench --bench parser`

use corral::http::chunked::decode_all;
use corral::http::request::{parse_request, HeadLimits, RequestHead};
use corral::http::response::{parse_response, ResponseHead};
use corral::http::rewrite::{write_upstream_request, Forwarded};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const LIMITS: HeadLimits = HeadLimits {
    max_header_bytes: 32 << 10,
    max_headers: 100,
    max_uri_bytes: 8 << 10,
};

/// A typical browser request head (about 500 bytes).
const BROWSER: &[u8] = b"GET /static/app/main.3f2a9c.js?v=12 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\nAccept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\nReferer: https://www.example.com/\r\nConnection: keep-alive\r\nCookie: session=8f14e45fceea167a5a36dedd4bea2543; theme=dark\r\nSec-Fetch-Dest: script\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Site: same-origin\r\nIf-None-Match: \"5e8f-1a2b\"\r\n\r\n";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 05:00:00 GMT\r\nContent-Type: application/javascript\r\nContent-Length: 1024\r\nLast-Modified: Thu, 26 Nov 2026 10:00:00 GMT\r\nConnection: keep-alive\r\nETag: \"5e8f-1a2b\"\r\nCache-Control: public, max-age=3600\r\nAccept-Ranges: bytes\r\n\r\n";

fn heads(c: &mut Criterion) {
    let mut g = c.benchmark_group("heads");
    g.throughput(Throughput::Bytes(BROWSER.len() as u64));
    let mut head = RequestHead::default();
    g.bench_function("parse_request", |b| {
        b.iter(|| parse_request(black_box(BROWSER), &LIMITS, &mut head).unwrap())
    });
    assert!(parse_request(BROWSER, &LIMITS, &mut head).unwrap());
    let mut out = Vec::with_capacity(1024);
    let fwd = Forwarded {
        client_ip: "192.0.2.10",
        proto: "http",
        backend_host: "10.0.0.1:8080",
    };
    g.bench_function("write_upstream_request", |b| {
        b.iter(|| {
            out.clear();
            write_upstream_request(&mut out, black_box(BROWSER), &head, &fwd);
        })
    });
    let mut rhead = ResponseHead::default();
    g.throughput(Throughput::Bytes(RESPONSE.len() as u64));
    g.bench_function("parse_response", |b| {
        b.iter(|| parse_response(black_box(RESPONSE), false, 65536, &mut rhead).unwrap())
    });
    g.finish();
}

fn chunked(c: &mut Criterion) {
    let mut body = Vec::new();
    for _ in 0..64 {
        body.extend_from_slice(b"400\r\n");
        body.extend(std::iter::repeat_n(b'x', 1024));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let mut g = c.benchmark_group("chunked");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("decode_64x1KiB", |b| {
        b.iter(|| decode_all(black_box(&body)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, heads, chunked);
criterion_main!(benches);
