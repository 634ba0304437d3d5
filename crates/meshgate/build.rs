//! Link settings for the `meshgate` binary.

fn main() {
    // Relative relocations packed as DT_RELR (glibc 2.36+, binutils 2.38+): the position-
    // independent binary's 400-odd KB of `.rela.dyn`, which the loader reads through at every
    // start, becomes a few KB, and those pages no longer count towards each process's RSS.
    // ASLR is unchanged. Only on Linux with GNU ld, where the flag is known.
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.ends_with("-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
