//! A child cgroup made for one test under the detected cgroup v2 mount; its processes are
//! killed and the directory removed on drop.
use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let mount = redirector::cgroup::cgroup2_mount().expect("cgroup v2 mount");
        let path = mount.join(name);
        if path.exists() {
            Self::remove(&path);
        }
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Runs `f` with this whole process moved into the cgroup, then moves it back: sockets
    /// `f` creates belong to this cgroup for good (a socket keeps the cgroup it was created
    /// in), as a server's do when it runs under the attached cgroup. For in-process servers
    /// of benchmarks.
    pub fn create_inside<T>(&self, f: impl FnOnce() -> T) -> T {
        let own = fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 entry in /proc/self/cgroup")
            .trim_start_matches('/')
            .to_owned();
        let mount = redirector::cgroup::cgroup2_mount().expect("cgroup v2 mount");
        let back = mount.join(own).join("cgroup.procs");
        fs::write(self.procs_file(), "0").expect("join the test cgroup");
        let out = f();
        fs::write(&back, "0").unwrap_or_else(|e| panic!("back to {}: {e}", back.display()));
        out
    }

    fn remove(path: &PathBuf) {
        // cgroup.kill (5.14+) SIGKILLs every member; then wait for them to leave.
        let _ = fs::write(path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_to_string(path.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty()) {
            if Instant::now() > deadline {
                eprintln!("cleanup: processes still in {}", path.display());
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // A member that has just left can keep the cgroup busy for a moment (its exit is
        // still being accounted): retry EBUSY briefly instead of leaving the directory behind.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match fs::remove_dir(path) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    eprintln!("cleanup: rmdir {}: {e}", path.display());
                    break;
                }
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        Self::remove(&self.path);
    }
}
