//! Noticing that config files changed.
//!
//! Editors often save by writing a new file and renaming it over the old one, and Kubernetes
//! updates a ConfigMap volume by swapping its `..data` symlink, so a config file's folder is
//! watched as well as the file. On Linux meshgate asks inotify, for that folder, only about
//! entries appearing, disappearing or being renamed, and for the file itself about writes
//! finished (closed) and `touch`. A watch for file events on a whole folder would make the
//! kernel treat every file in it as watched: a busy neighbour (an access log, a load
//! generator's request log) would pay for that on each write, and with `IN_MODIFY` wake the
//! watcher each time too. Config folders given with `--config` are watched for their files'
//! content as well, recursively. Elsewhere the `notify` crate watches.

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

/// What a change is to: a config file named on the command line (by its folder and name), or
/// anything under a config folder. Only YAML files count in config folders, since only they are
/// read; editor swap files and other droppings do not trigger a reload.
struct Targets {
    files: Vec<(PathBuf, std::ffi::OsString)>,
    folders: Vec<PathBuf>,
}

impl Targets {
    fn new(paths: &[PathBuf]) -> Self {
        let mut targets = Targets {
            files: Vec::new(),
            folders: Vec::new(),
        };
        for path in paths {
            if path.is_dir() {
                targets.folders.push(path.clone());
            } else if let Some(name) = path.file_name() {
                let folder = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                targets.files.push((folder, name.to_os_string()));
            }
        }
        targets
    }
}

fn is_yaml(name: &Path) -> bool {
    name.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

/// Kubernetes' atomic writer replaces a ConfigMap volume's contents by renaming a new `..data`
/// symlink over the old one; the file names the config points at stay the same.
const KUBERNETES_DATA_LINK: &str = "..data";

/// Starts watching; each change sends `()` on `changed`. Keep the returned value: with `notify`,
/// dropping it ends the watch (on Linux the watch lasts until the process ends).
pub fn start(paths: &[PathBuf], changed: mpsc::UnboundedSender<()>) -> std::io::Result<ConfigWatch> {
    platform::start(Targets::new(paths), changed)
}

pub use platform::ConfigWatch;

#[cfg(target_os = "linux")]
mod platform {
    use std::collections::HashMap;
    use std::ffi::{CString, OsStr, OsString};
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Path, PathBuf};

    use tokio::sync::mpsc;

    use super::{KUBERNETES_DATA_LINK, Targets, is_yaml};

    /// The watch runs on its own thread until the process ends or nobody listens any more.
    pub struct ConfigWatch;

    /// A config file's folder: only its entries appearing, disappearing and being renamed.
    /// These are not events on the files themselves, so the kernel does not mark the folder's
    /// files as watched, and their writers pay nothing for the watch.
    const ENTRIES: u32 = libc::IN_CREATE
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_DELETE
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF
        | libc::IN_ONLYDIR;
    /// A config file itself (through symlinks): written and closed, or `touch`ed.
    const CONTENT: u32 = libc::IN_CLOSE_WRITE | libc::IN_ATTRIB;

    /// What one watch descriptor stands for. One inode watched for several reasons keeps one
    /// descriptor, so the reasons are merged.
    #[derive(Default)]
    struct Watch {
        path: PathBuf,
        /// A config file's content.
        file: bool,
        /// The folder of these config files: an entry of that name changing is a new file.
        file_names: Vec<OsString>,
        /// A config folder or one below it: its YAML files and subfolders count.
        tree: bool,
    }

    struct Inotify {
        fd: OwnedFd,
        watches: HashMap<i32, Watch>,
    }

    impl Inotify {
        fn add(&mut self, path: &Path, mask: u32) -> io::Result<&mut Watch> {
            let c_path = CString::new(path.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
            // SAFETY: the fd is an inotify instance and `c_path` a NUL-terminated string.
            // IN_MASK_ADD keeps what an earlier watch of the same inode asked for.
            let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c_path.as_ptr(), mask | libc::IN_MASK_ADD) };
            if wd < 0 {
                return Err(io::Error::last_os_error());
            }
            let watch = self.watches.entry(wd).or_default();
            watch.path = path.to_path_buf();
            Ok(watch)
        }

        /// A config file: its content, and its folder's entries, so a file renamed over it or
        /// created in its place is seen (and then watched in turn). A config file that is a
        /// symlink is watched in its target's folder too, where deploy tools replace it.
        fn add_file(&mut self, folder: &Path, name: &OsStr) -> io::Result<()> {
            self.watch_name(folder, name)?;
            if let Ok(target) = std::fs::canonicalize(folder.join(name))
                && let (Some(target_folder), Some(target_name)) = (target.parent(), target.file_name())
                && target_folder != folder
            {
                self.watch_name(target_folder, target_name)?;
            }
            self.watch_content(&folder.join(name))
        }

        fn watch_name(&mut self, folder: &Path, name: &OsStr) -> io::Result<()> {
            let parent = self.add(folder, ENTRIES)?;
            if !parent.file_names.iter().any(|n| n == name) {
                parent.file_names.push(name.to_os_string());
            }
            Ok(())
        }

        /// Watches the file now at `path`; a missing file is seen when it appears in its folder.
        fn watch_content(&mut self, path: &Path) -> io::Result<()> {
            match self.add(path, CONTENT) {
                Ok(watch) => {
                    watch.file = true;
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        }

        /// Stops watching the content of the file that was at `path`.
        fn unwatch_content(&mut self, path: &Path) {
            let stale: Vec<i32> = self
                .watches
                .iter()
                .filter(|(_, w)| w.file && w.path == path)
                .map(|(wd, _)| *wd)
                .collect();
            for wd in stale {
                self.watches.remove(&wd);
                // SAFETY: removes a watch of this inotify instance; an unknown one is an error only.
                unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
            }
        }

        /// A config folder and every folder below it, following symlinks as the config reader
        /// does. A folder that cannot be watched is logged and skipped, so the rest still is.
        fn add_tree(&mut self, root: &Path) -> io::Result<()> {
            let mut visited = std::collections::HashSet::new();
            self.add_tree_below(root, &mut visited)
        }

        fn add_tree_below(
            &mut self,
            folder: &Path,
            visited: &mut std::collections::HashSet<PathBuf>,
        ) -> io::Result<()> {
            // A symlink back up the tree must not loop.
            if !visited.insert(std::fs::canonicalize(folder).unwrap_or_else(|_| folder.to_path_buf())) {
                return Ok(());
            }
            self.add(folder, ENTRIES | CONTENT)?.tree = true;
            for entry in std::fs::read_dir(folder)?.flatten() {
                let path = entry.path();
                if path.is_dir()
                    && let Err(e) = self.add_tree_below(&path, visited)
                {
                    tracing::warn!(folder = %path.display(), error = %e, "cannot watch a config folder; reload with SIGHUP after changing it");
                }
            }
            Ok(())
        }

        /// After lost events: watch whatever now answers to each config file's name, and every
        /// folder of the config folders.
        fn repair(&mut self) {
            let names: Vec<PathBuf> = self
                .watches
                .values()
                .flat_map(|w| w.file_names.iter().map(|n| w.path.join(n)))
                .collect();
            for path in names {
                let _ = self.watch_content(&path);
            }
            let trees: Vec<PathBuf> = self
                .watches
                .values()
                .filter(|w| w.tree)
                .map(|w| w.path.clone())
                .collect();
            for tree in trees {
                let _ = self.add_tree(&tree);
            }
        }

        /// Whether one event is a change to the config. Starts watching what replaced a config
        /// file, and folders created in a config folder.
        fn is_change(&mut self, wd: i32, mask: u32, name: &OsStr) -> bool {
            if mask & libc::IN_Q_OVERFLOW != 0 {
                self.repair();
                return true;
            }
            if mask & libc::IN_IGNORED != 0 {
                self.watches.remove(&wd);
                return false;
            }
            let Some(watch) = self.watches.get(&wd) else {
                return false;
            };
            if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                return true;
            }
            if name.is_empty() {
                // An event on a watched file itself: written and closed, or touched.
                return watch.file;
            }
            let folder = watch.path.clone();
            let tree = watch.tree;
            let new_entry = mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
            let gone = mask & (libc::IN_MOVED_FROM | libc::IN_DELETE) != 0;
            if gone && watch.file_names.iter().any(|n| n == name) {
                // The name no longer leads to the file watched for it (`mv config.yaml old.yaml`):
                // that file's writes are not config changes any more.
                self.unwatch_content(&folder.join(name));
                return true;
            }
            if name == KUBERNETES_DATA_LINK || watch.file_names.iter().any(|n| n == name) {
                // A new file (or every file, after a `..data` swap) now answers to these names.
                let names: Vec<OsString> = if name == KUBERNETES_DATA_LINK {
                    watch.file_names.clone()
                } else {
                    vec![name.to_os_string()]
                };
                for name in names {
                    if let Err(e) = self.watch_content(&folder.join(&name)) {
                        tracing::warn!(file = %folder.join(&name).display(), error = %e, "cannot watch a config file; reload with SIGHUP");
                    }
                }
                return true;
            }
            if !tree {
                return false;
            }
            if new_entry && mask & libc::IN_ISDIR != 0 {
                let path = folder.join(name);
                if let Err(e) = self.add_tree(&path) {
                    tracing::warn!(folder = %path.display(), error = %e, "cannot watch a new config folder; reload with SIGHUP");
                }
                return true;
            }
            is_yaml(Path::new(name))
        }

        fn run(mut self, changed: mpsc::UnboundedSender<()>) {
            // Room for many events; each is 16 bytes plus its NUL-padded name.
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // SAFETY: reads at most `buf.len()` bytes into `buf`.
                let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    tracing::warn!(error = %io::Error::last_os_error(), "config watch stopped; reload with SIGHUP");
                    return;
                }
                let mut change = false;
                let mut events = &buf[..n as usize];
                // struct inotify_event: wd i32, mask u32, cookie u32, len u32, then `len` name bytes.
                while events.len() >= 16 {
                    let field = |at: usize| [events[at], events[at + 1], events[at + 2], events[at + 3]];
                    let wd = i32::from_ne_bytes(field(0));
                    let mask = u32::from_ne_bytes(field(4));
                    let len = u32::from_ne_bytes(field(12)) as usize;
                    let Some(name) = events.get(16..16 + len) else { break };
                    let name = OsStr::from_bytes(name.split(|b| *b == 0).next().unwrap_or_default());
                    change |= self.is_change(wd, mask, name);
                    events = &events[16 + len..];
                }
                if change && changed.send(()).is_err() {
                    return;
                }
            }
        }
    }

    pub(super) fn start(targets: Targets, changed: mpsc::UnboundedSender<()>) -> io::Result<ConfigWatch> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut inotify = Inotify {
            // SAFETY: `fd` is a fresh descriptor owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            watches: HashMap::new(),
        };
        for (folder, name) in &targets.files {
            inotify.add_file(folder, name)?;
        }
        for folder in &targets.folders {
            if let Err(e) = inotify.add_tree(folder) {
                tracing::warn!(folder = %folder.display(), error = %e, "cannot watch a config folder; reload with SIGHUP after changing it");
            }
        }
        std::thread::Builder::new()
            .name("config-watch".into())
            .spawn(move || inotify.run(changed))?;
        Ok(ConfigWatch)
    }
}

#[cfg(not(target_os = "linux"))]
mod platform {
    use std::io;

    use notify::{RecursiveMode, Watcher};
    use tokio::sync::mpsc;

    use super::{KUBERNETES_DATA_LINK, Targets, is_yaml};

    /// The `notify` watcher; dropping it ends the watch.
    pub struct ConfigWatch(#[allow(dead_code)] notify::RecommendedWatcher);

    pub(super) fn start(targets: Targets, changed: mpsc::UnboundedSender<()>) -> io::Result<ConfigWatch> {
        let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let files: Vec<_> = targets.files.iter().map(|(d, n)| canonical(d).join(n)).collect();
        let folders: Vec<_> = targets.folders.iter().map(|d| canonical(d)).collect();
        let (watched_files, watched_folders) = (files.clone(), folders.clone());
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let relevant = event.paths.iter().any(|p| {
                watched_files.iter().any(|f| f == p)
                    || (is_yaml(p) && watched_folders.iter().any(|d| p.starts_with(d)))
                    || p.file_name().is_some_and(|n| n == KUBERNETES_DATA_LINK)
            });
            if relevant {
                let _ = changed.send(());
            }
        })
        .map_err(io::Error::other)?;
        for file in &files {
            let dir = file.parent().unwrap_or(file);
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(io::Error::other)?;
        }
        for folder in &folders {
            watcher
                .watch(folder, RecursiveMode::Recursive)
                .map_err(io::Error::other)?;
        }
        Ok(ConfigWatch(watcher))
    }
}
