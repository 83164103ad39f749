//! `corral demo`: a self-contained tour on loopback.

pub fn run(_seconds: u64) -> Result<(), String> {
    Err("not yet".into())
}
