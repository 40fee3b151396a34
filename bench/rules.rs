//! Rule evaluation cost: the shipped rule set (rules/) on a small corpus of
//! messages, through the same `RuleSet::data` call the gateway makes at end
//! of DATA (MIME parse, the `m` object, every `data(m)` script, the score).
//! SPF/DKIM/DMARC are off here: their cost is DNS, measured by the
//! throughput benchmark with checks on.
//!
//!     cargo bench --bench rules            # ITERATIONS=20000 by default

use std::time::{Duration, Instant};

use postern::config::{ChecksConfig, DnsConfig, OnError, RulesConfig};
use postern::policy::{ConnInfo, Policy, TxInfo};

fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let plain = b"From: Alice <alice@far.test>\r\nTo: bob@example.test\r\nSubject: Lunch on Friday?\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@far.test>\r\n\r\nHi Bob,\r\n\r\nshall we have lunch on Friday at noon?\r\n\r\nAlice\r\n".to_vec();
    let mut multipart = b"From: Shop <news@shop.test>\r\nTo: bob@example.test\r\nSubject: =?utf-8?q?Your_invoice_=E2=82=AC42?=\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n--b2\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nYour invoice is attached. Total: =E2=82=AC42.\r\n--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Your invoice is attached.</p>\r\n--b2--\r\n--b1\r\nContent-Type: application/pdf; name=\"invoice.pdf\"\r\nContent-Disposition: attachment; filename=\"invoice.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n".to_vec();
    for _ in 0..40 {
        multipart.extend_from_slice(
            b"JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFIvRmlsdGVyIC9GbGF0ZURlY29kZT4+\r\n",
        );
    }
    multipart.extend_from_slice(b"--b1--\r\n");
    let exe = b"From: x@far.test\r\nTo: bob@example.test\r\nSubject: open me\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"z\"\r\n\r\n--z\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--z\r\nContent-Type: application/octet-stream; name=\"Invoice.PDF.exe\"\r\nContent-Disposition: attachment; filename=\"Invoice.PDF.exe\"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAgAAAAA==\r\n--z--\r\n".to_vec();
    let mut large =
        b"From: list@far.test\r\nTo: bob@example.test\r\nSubject: digest\r\n\r\n".to_vec();
    for i in 0..2000 {
        large.extend_from_slice(
            format!("line {i} of a long digest message, nothing to see here\r\n").as_bytes(),
        );
    }
    vec![
        ("plain 0.3 KiB", plain),
        ("multipart+pdf 4 KiB", multipart),
        ("exe attachment", exe),
        ("digest 110 KiB", large),
    ]
}

fn main() {
    let iterations: usize = std::env::var("ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // No rate limits: they are not what is measured, and would throttle the loop.
    let no_policies = tempfile::tempdir().expect("temp dir");
    let policy = Policy::load(
        RulesConfig {
            dir: root.join("rules"),
            max_operations: 100_000,
            on_error: OnError::Tempfail,
            quarantine_score: 10.0,
            ..RulesConfig::default()
        },
        no_policies.path(),
        ChecksConfig {
            spf: false,
            dkim: false,
            dmarc: false,
            ..Default::default()
        },
        DnsConfig::default(),
        "bench.test",
    )
    .unwrap_or_else(|p| panic!("shipped rules do not load: {p:?}"));
    let set = policy.current();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tx = TxInfo {
        conn: ConnInfo {
            ip: "192.0.2.10".parse().expect("ip"),
            port: 40000,
            tls: true,
        },
        helo: "mail.far.test".into(),
        from: "alice@far.test".into(),
        auth_user: None,
        rcpts: vec!["bob@example.test".into()],
        submission: false,
        trusted: false,
    };
    println!("shipped rules: {}", set.script_names().join(", "));
    println!(
        "{:<22} {:>10} {:>12} {:>12}  verdict",
        "message", "evals", "evals/s", "µs/message"
    );
    let mut total = Duration::ZERO;
    let mut n = 0;
    for (name, msg) in corpus() {
        let (elapsed, verdict) = rt.block_on(async {
            for _ in 0..200 {
                set.data(&tx, &msg).await; // warm-up
            }
            let start = Instant::now();
            let mut v = String::new();
            for _ in 0..iterations {
                v = set.data(&tx, &msg).await.verdict.word().to_string();
            }
            (start.elapsed(), v)
        });
        total += elapsed;
        n += iterations;
        println!(
            "{:<22} {:>10} {:>12.0} {:>12.1}  {}",
            name,
            iterations,
            iterations as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1e6 / iterations as f64,
            verdict
        );
    }
    println!(
        "{:<22} {:>10} {:>12.0} {:>12.1}",
        "all",
        n,
        n as f64 / total.as_secs_f64(),
        total.as_secs_f64() * 1e6 / n as f64
    );
}
