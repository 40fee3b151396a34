//! Digest-link tokens as a web client sends them: any text is answered
//! (valid or not) without a panic, and a token we sign for any login (up to
//! the 255 bytes users.toml allows), id and action verifies to exactly that
//! until it expires.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::fuzzing::{link_sign, link_verify};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = link_verify(text, 0);
    }
    if data.len() >= 9 {
        let id = u64::from_le_bytes(data[1..9].try_into().unwrap_or_default());
        let login = String::from_utf8_lossy(&data[9..]);
        if login.len() > 255 {
            return;
        }
        let token = link_sign(&login, id, data[0], 1_000);
        let got = link_verify(&token, 999).expect("our own token verifies");
        assert_eq!((got.0.as_str(), got.1), (login.as_ref(), id));
        assert!(link_verify(&token, 1_000).is_none(), "expired");
    }
});
