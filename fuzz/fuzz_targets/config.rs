//! Config and policy loading on arbitrary text: `postern.toml`,
//! `ratelimits.toml`, `users.toml` and a rule-suite case. Input: a selector
//! byte, then the file's text. Never a panic; errors name the file and
//! (for the TOML files) a line.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use postern::fuzzing::{config_problems, ratelimits, suite_cases, users};
use postern::policy::Problem;

/// One suite directory per fuzzing process, with the message the cases name.
fn suite_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("postern-fuzz-suite-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        std::fs::write(d.join("msg.eml"), b"Subject: hi\r\n\r\nbody\r\n").expect("message");
        d
    })
}

fn lines_named(problems: &[Problem], path: &Path, text: &str) {
    let lines = text.split('\n').count();
    for p in problems {
        assert_eq!(p.file, path, "{p}");
        if let Some(l) = p.line {
            assert!(l >= 1 && l <= lines.max(1), "line {l} of {lines}: {p}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match sel % 4 {
        0 => {
            let path = Path::new("/etc/postern/postern.toml");
            let problems = config_problems(text, path);
            lines_named(&problems, path, text);
        }
        1 => {
            let path = Path::new("/etc/postern/policies/ratelimits.toml");
            if let Err(problems) = ratelimits(text, path) {
                assert!(!problems.is_empty());
                lines_named(&problems, path, text);
                assert!(problems.iter().all(|p| p.line.is_some()), "{problems:?}");
            }
        }
        2 => {
            if let Err(e) = users(text) {
                assert!(e.starts_with("users.toml: "), "{e}");
            }
        }
        _ => {
            let dir = suite_dir();
            let file = dir.join("case.toml");
            std::fs::write(&file, text).expect("case file");
            if let Err(problems) = suite_cases(dir) {
                assert!(!problems.is_empty());
                lines_named(&problems, &file, text);
            }
        }
    }
});
