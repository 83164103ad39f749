//! The origin store end to end: real files in a temporary folder on a real
//! filesystem, served by a real corral with `--origin-dir`.

mod common;

use common::*;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

/// A fresh folder with files of awkward sizes; deterministic contents.
fn tree(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("corral-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for (f, n) in [
        ("one", 1),
        ("b4095", 4095),
        ("b4096", 4096),
        ("b4097", 4097),
        ("big.bin", 1_000_003),
        ("sub/page.html", 5000),
    ] {
        std::fs::write(dir.join(f), content(n)).unwrap();
    }
    std::fs::write(dir.join("empty"), b"").unwrap();
    std::fs::write(dir.join("with space.txt"), b"spaced\n").unwrap();
    // A symlink out of the root, and one inside it.
    let outside =
        std::env::temp_dir().join(format!("corral-store-{}-{name}-secret", std::process::id()));
    std::fs::write(&outside, b"secret").unwrap();
    let _ = std::os::unix::fs::symlink(&outside, dir.join("escape"));
    let _ = std::os::unix::fs::symlink(dir.join("one"), dir.join("alias"));
    dir
}

fn content(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
}

fn store_proxy(dir: &std::path::Path, extra: &[&str]) -> Proxy {
    let d = dir.to_str().unwrap();
    let mut args = vec!["--origin-dir", d, "--admin", "127.0.0.1:0"];
    if !extra.contains(&"--shards") {
        args.extend_from_slice(&["--shards", "2"]);
    }
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

fn ask(p: &Proxy, path: &str, headers: &str) -> Response {
    let mut s = p.connect();
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut BufReader::new(s), false).unwrap()
}

fn metric(p: &Proxy, name: &str) -> f64 {
    metric_sum(p.admin_addr(), name)
}

#[test]
fn whole_files_ranges_and_validators() {
    let dir = tree("whole");
    let p = store_proxy(&dir, &[]);
    for (f, n) in [
        ("one", 1),
        ("b4095", 4095),
        ("b4096", 4096),
        ("b4097", 4097),
        ("big.bin", 1_000_003),
    ] {
        let r = ask(&p, &format!("/{f}"), "");
        assert_eq!(r.status, 200, "{f}");
        assert_eq!(r.header("content-length"), Some(n.to_string().as_str()));
        assert!(r.body == content(n), "{f}: body differs");
        assert_eq!(r.header("accept-ranges"), Some("bytes"));
    }
    let r = ask(&p, "/empty", "");
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(r.header("content-length"), Some("0"));
    let r = ask(&p, "/sub/page.html", "");
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(ask(&p, "/with%20space.txt", "").text(), "spaced\n");
    assert_eq!(
        ask(&p, "/alias", "").body,
        content(1),
        "a symlink inside the root"
    );
    // Ranges at and across block boundaries.
    let big = content(1_000_003);
    for (a, b) in [
        (0u64, 0u64),
        (4095, 4096),
        (4090, 4100),
        (8191, 8192 + 4096 * 3 + 5),
        (999_000, 1_000_002),
    ] {
        let r = ask(&p, "/big.bin", &format!("Range: bytes={a}-{b}\r\n"));
        assert_eq!(r.status, 206, "{a}-{b}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {a}-{b}/1000003").as_str())
        );
        assert!(r.body == big[a as usize..=b as usize], "{a}-{b}");
    }
    let r = ask(&p, "/big.bin", "Range: bytes=-10\r\n");
    assert!(r.body == big[big.len() - 10..]);
    let r = ask(&p, "/big.bin", "Range: bytes=999990-\r\n");
    assert!(r.body == big[999_990..]);
    // Two Range lines are one list of two ranges: answered whole, as a
    // multi-range request (the last line won).
    let r = ask(&p, "/b4097", "Range: bytes=0-1\r\nRange: bytes=2-3\r\n");
    assert_eq!((r.status, r.body.len()), (200, 4097));
    let r = ask(&p, "/b4097", "Range: bytes=5000-6000\r\n");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */4097"));
    // Validators and conditionals.
    let r = ask(&p, "/b4096", "");
    let etag = r.header("etag").unwrap().to_string();
    let lm = r.header("last-modified").unwrap().to_string();
    assert_eq!(
        ask(&p, "/b4096", &format!("If-None-Match: {etag}\r\n")).status,
        304
    );
    assert_eq!(
        ask(&p, "/b4096", "If-None-Match: \"other\"\r\n").status,
        200
    );
    assert_eq!(
        ask(&p, "/b4096", &format!("If-Modified-Since: {lm}\r\n")).status,
        304
    );
    // Preconditions (RFC 9110 §13.2.2): If-Match first, strongly; a
    // download resumed against a replaced file gets 412, not its bytes.
    let range = "Range: bytes=0-9\r\n";
    let r = ask(&p, "/b4096", &format!("If-Match: {etag}\r\n{range}"));
    assert_eq!(r.status, 206);
    let r = ask(&p, "/b4096", &format!("If-Match: \"old\"\r\n{range}"));
    assert_eq!(r.status, 412);
    assert!(r.header("date").is_some());
    assert_eq!(
        ask(&p, "/b4096", &format!("If-Match: W/{etag}\r\n")).status,
        412
    );
    assert_eq!(ask(&p, "/b4096", "If-Match: *\r\n").status, 200);
    assert_eq!(
        ask(&p, "/b4096", &format!("If-Unmodified-Since: {lm}\r\n")).status,
        200
    );
    assert_eq!(
        ask(
            &p,
            "/b4096",
            "If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
        )
        .status,
        412
    );
    // Every answer is dated (RFC 9110 §6.6.1).
    assert!(ask(&p, "/b4096", "").header("date").is_some());
    // HEAD: the same head, no body.
    let mut s = p.connect();
    s.write_all(b"HEAD /b4097 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_response(&mut BufReader::new(s), true).unwrap();
    assert_eq!((r.status, r.header("content-length")), (200, Some("4097")));
    // A HEAD's Range is ignored (RFC 9110 §14.2: GET only).
    let mut s = p.connect();
    s.write_all(
        b"HEAD /b4097 HTTP/1.1\r\nHost: t\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let r = read_response(&mut BufReader::new(s), true).unwrap();
    assert_eq!((r.status, r.header("content-length")), (200, Some("4097")));
    // HEAD of a missing file, pipelined with a GET: the 404 has no body
    // (else the GET's answer would be read as its body).
    let mut s = p.connect();
    s.write_all(b"HEAD /missing HTTP/1.1\r\nHost: t\r\n\r\nGET /one HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut rd = BufReader::new(s);
    let r = read_response(&mut rd, true).unwrap();
    assert_eq!(r.status, 404);
    let r = read_response(&mut rd, false).unwrap();
    assert_eq!((r.status, r.body.clone()), (200, content(1)));
    // An HTTP/1.0 client asking for keep-alive is told it is kept, for a
    // file and for an error alike, and the connection serves it again.
    let mut s = p.connect();
    s.write_all(b"GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /missing HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /one HTTP/1.0\r\n\r\n")
        .unwrap();
    let mut rd = BufReader::new(s);
    for status in [200, 404] {
        let r = read_response(&mut rd, false).unwrap();
        assert_eq!(r.status, status);
        assert_eq!(r.header("connection"), Some("keep-alive"), "{status}");
    }
    let r = read_response(&mut rd, false).unwrap();
    assert_eq!(r.status, 200);
}

/// How many of the proxy's descriptors are open on a file whose path
/// contains `name`.
fn held_open(p: &Proxy, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains(name))
        .count()
}

#[test]
fn a_deleted_file_is_let_go() {
    // Its descriptor was kept open for later requests; once a request finds
    // it gone (404), the descriptor goes too, so its space is freed.
    let dir = tree("deleted");
    std::fs::write(dir.join("victim"), content(10_000)).unwrap();
    let p = store_proxy(&dir, &["--shards", "1"]);
    assert_eq!(ask(&p, "/victim", "").body, content(10_000));
    let held = || held_open(&p, "victim") > 0;
    assert!(held(), "the file is kept open between requests");
    std::fs::remove_file(dir.join("victim")).unwrap();
    assert_eq!(ask(&p, "/victim", "").status, 404);
    // The close itself goes through the ring: give it a moment.
    let t = std::time::Instant::now();
    while held() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!held(), "a deleted file's descriptor is still open");
}

#[test]
fn unsafe_paths_and_methods_are_refused() {
    let dir = tree("unsafe");
    let _ = std::os::unix::fs::symlink(dir.join("loop"), dir.join("loop"));
    // A directory out of the root through a symlink: what it holds, or
    // does not, is nobody's business (a 404 for a missing name and a 403
    // for a present one told which files exist out there).
    let out_dir = std::env::temp_dir().join(format!("corral-store-{}-outdir", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("present.txt"), b"secret").unwrap();
    let _ = std::os::unix::fs::symlink(&out_dir, dir.join("outdir"));
    let long_name = format!("/{}", "n".repeat(300));
    let p = store_proxy(&dir, &[]);
    for (path, want) in [
        ("/outdir", 403),
        ("/outdir/present.txt", 403),
        ("/outdir/absent.txt", 403),
        ("/outdir/absent/deeper.txt", 403),
        ("/outdir/present.txt/x", 403),
        ("/../etc/passwd", 403),
        ("/sub/../../etc/passwd", 403),
        ("/%2e%2e/%2e%2e/etc/passwd", 403),
        ("/sub%2f..%2f..%2fetc%2fpasswd", 403),
        ("/escape", 403),
        ("/sub", 403),
        ("/", 403),
        ("/missing", 404),
        // A path through a file, a name too long, a symlink loop.
        ("/one/x", 404),
        // A file named as a directory (nginx: ENOTDIR, 404); a directory
        // named as one is still a directory.
        ("/one/", 404),
        ("/one/.", 404),
        ("/sub/", 403),
        ("/sub/page.html/", 404),
        (long_name.as_str(), 404),
        ("/loop", 403),
        ("/a%00b", 400),
        ("/bad%zz", 400),
    ] {
        let r = ask(&p, path, "");
        assert_eq!(r.status, want, "{path}");
        assert!(
            !r.text().contains("secret") && !r.text().contains("root:"),
            "{path}"
        );
    }
    let mut s = p.connect();
    s.write_all(b"POST /one HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let r = read_response(&mut BufReader::new(s), false).unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    // Targets no route can match, with no pool behind the store: a 400 for
    // one that is not origin-form, a 404 for `OPTIONS *`, and the
    // connection (and shard) carry on.
    let mut s = p.connect();
    s.write_all(b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\nGET /one HTTP/1.1\r\nHost: t\r\n\r\nGET foo HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut rd = BufReader::new(s);
    for want in [404, 200, 400] {
        assert_eq!(read_response(&mut rd, false).unwrap().status, want);
    }
    assert_eq!(ask(&p, "/one", "").body, content(1));
}

#[test]
fn a_replaced_file_is_noticed() {
    let dir = tree("replace");
    let p = store_proxy(&dir, &["--shards", "1"]);
    let mut c = p.connect();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut get = || {
        c.write_all(b"GET /sub/page.html HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        read_response(&mut r, false).unwrap()
    };
    assert!(get().body == content(5000));
    assert!(get().body == content(5000));
    // Replaced (a new inode), then rewritten in place with another size.
    let tmp = dir.join("sub/page.new");
    std::fs::write(&tmp, b"new contents").unwrap();
    std::fs::rename(&tmp, dir.join("sub/page.html")).unwrap();
    assert_eq!(get().text(), "new contents");
    std::fs::write(dir.join("sub/page.html"), b"third").unwrap();
    let third = get();
    assert_eq!(third.text(), "third");
    // Rewritten in place with the same size and its mtime set back (`cp
    // -p`, a reproducible build): same inode, size and mtime, new bytes.
    let path = dir.join("sub/page.html");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::write(&path, b"THIRD").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let fourth = get();
    assert_eq!(fourth.text(), "THIRD");
    assert_ne!(fourth.header("etag"), third.header("etag"));
}

#[test]
fn clustered_concurrent_readers_share_reads() {
    let dir = tree("cluster");
    let p = store_proxy(&dir, &["--shards", "1"]);
    let big = content(1_000_003);
    // 28 clients each read one consecutive 16 KiB range of the same
    // region at the same moment, twice over (56 ranges: inside the file).
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(28));
    let handles: Vec<_> = (0..28u64)
        .map(|i| {
            let (addr, barrier) = (p.addr, barrier.clone());
            std::thread::spawn(move || {
                let s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut bodies = Vec::new();
                for round in 0..2u64 {
                    let a = 16384 * (i + 28 * round);
                    barrier.wait();
                    let req = format!(
                        "GET /big.bin HTTP/1.1\r\nHost: t\r\nRange: bytes={a}-{}\r\n\r\n",
                        a + 16383
                    );
                    w.write_all(req.as_bytes()).unwrap();
                    bodies.push((a, read_response(&mut r, false).unwrap()));
                }
                bodies
            })
        })
        .collect();
    let mut requests = 0;
    for h in handles {
        for (a, r) in h.join().unwrap() {
            assert_eq!(r.status, 206);
            assert!(r.body == big[a as usize..a as usize + 16384]);
            requests += 1;
        }
    }
    let reads = metric(&p, "corral_store_reads_total");
    let merged = metric(&p, "corral_store_merged_reads_total");
    let bytes = metric(&p, "corral_store_read_bytes_total");
    assert_eq!(requests, 56);
    // 56 requests of 4 blocks each, merged into reads of up to 32 blocks:
    // far fewer reads than requests.
    eprintln!("{reads} reads ({merged} merged) for 56 requests");
    assert!(reads <= 56.0 / 2.0, "{reads} reads for 56 requests");
    assert!(merged >= 1.0);
    // Nothing read twice, nothing read that was not asked for.
    assert_eq!(bytes, 56.0 * 16384.0);
    assert_eq!(metric(&p, "corral_store_blocks_requested_total"), 224.0);
}

#[test]
fn a_file_asked_for_as_a_directory_stays_kept() {
    // `/b4096/` is a 404 that must not drop the open file `b4096` and its
    // cached blocks (`Path` compares `b4096/.` equal to `b4096`): asking for
    // it again costs no read of the store.
    let dir = tree("dirname");
    let p = store_proxy(&dir, &["--shards", "1"]);
    assert_eq!(ask(&p, "/b4096", "").body, content(4096));
    let reads = metric(&p, "corral_store_reads_total");
    assert!(reads >= 1.0);
    for path in ["/b4096/", "/b4096/."] {
        assert_eq!(ask(&p, path, "").status, 404, "{path}");
    }
    assert_eq!(ask(&p, "/b4096", "").body, content(4096));
    assert_eq!(metric(&p, "corral_store_reads_total"), reads);
}

#[test]
fn a_deleted_file_is_let_go_without_being_asked_for_again() {
    // Served once, then deleted: within the next sweep (a second) corral
    // no longer holds it open, so its space is freed.
    let dir = tree("deleted");
    std::fs::write(dir.join("doomed.bin"), content(100_000)).unwrap();
    let p = store_proxy(&dir, &["--shards", "1"]);
    assert_eq!(ask(&p, "/doomed.bin", "").body, content(100_000));
    let held = || held_open(&p, "doomed.bin");
    assert_eq!(held(), 1, "the file is kept open while it exists");
    std::fs::remove_file(dir.join("doomed.bin")).unwrap();
    let t = std::time::Instant::now();
    while held() > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "still held");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ask(&p, "/doomed.bin", "").status, 404);
    assert_eq!(ask(&p, "/one", "").body, content(1));
}

#[test]
fn tmpfs_falls_back_to_buffered_reads_and_says_so() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm here: nothing to check");
        return;
    }
    let dir = shm.join(format!("corral-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("x.bin"), content(10_000)).unwrap();
    let p = store_proxy(&dir, &["--shards", "1"]);
    let r = ask(&p, "/x.bin", "Range: bytes=4000-8999\r\n");
    assert_eq!(r.status, 206);
    assert!(r.body == content(10_000)[4000..9000]);
    let err = p.stderr.lock().unwrap().clone();
    assert!(
        err.contains("buffered reads") && err.contains("tmpfs"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_client_that_half_closes_and_stops_reading_does_not_stall_its_shard() {
    // The client asks for 32 MiB, shuts its sending side and never reads:
    // corral's writes block, with the peer's FIN already seen. The shard
    // must wait for room (not retry the write at once, forever) and go on
    // serving others.
    let dir = tree("halfclose");
    std::fs::write(dir.join("huge.bin"), vec![7u8; 32 << 20]).unwrap();
    let p = store_proxy(&dir, &["--shards", "1"]);
    let mut stuck = TcpStream::connect(p.addr).unwrap();
    stuck
        .write_all(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    stuck.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let mut s = TcpStream::connect(p.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /one HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let r = read_response(&mut BufReader::new(s), false).expect("the shard answers");
        assert_eq!(r.status, 200);
    }
    drop(stuck);
}
