//! Resident memory after start-up.
//!
//! Loading and compiling the configuration, the command line and the many protocol and
//! config formats run code that serving requests never touches again. The kernel maps a
//! binary's code in 64 KiB runs as it is first executed, so after start-up about 5 MiB of
//! code stays resident, most of it start-up's. Once every listener serves, meshgate tells the
//! kernel it no longer needs its code pages (`MADV_DONTNEED`); the request path maps back
//! what it uses, and a reload maps the compiler back while it runs. Only code is released,
//! and only where the process holds no modified copy of it: the pages still come from the
//! binary on disk (via the page cache), so nothing is lost.

/// Releases this process's mappings of its own executable code. Errors are ignored: this is
/// only an optimisation.
pub fn release_code_pages() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let exe = exe.to_string_lossy();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        {
            // "start-end perms offset dev inode path": executable, private, this binary.
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            current = (perms == "r-xp" && path == exe).then_some((start, end));
            continue;
        }
        // A mapping with anonymous (copied-on-write) pages holds changes the file does not.
        if first == "Anonymous:"
            && let Some((start, end)) = current.take()
            && fields.next() == Some("0")
        {
            // SAFETY: the range is a read-only, private mapping of the executable with no
            // private copies; MADV_DONTNEED only drops its page-table entries, and the next
            // access maps the same file contents again.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}
