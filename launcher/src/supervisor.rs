//! Worker processes: spawning one `liftoff worker` per device rank, the handshake that hands each
//! group its rendezvous, watching them, and stopping them so that none outlives the launcher.

use anyhow::{anyhow, bail, Context, Result};
use liftoff_engine::worker::protocol::{self, FromWorker, WorkerInit};
use liftoff_engine::worker::{GroupMember, WorkerDevice, WorkerGroup};
use liftoff_server::WorkerInfo;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a spawned worker has to connect and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);

/// The devices of one tensor-parallel group, by rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    pub devices: Vec<WorkerDevice>,
}

/// One worker process.
struct Worker {
    group: usize,
    rank: usize,
    child: Child,
    exited: bool,
}

/// The running worker processes of every group.
pub struct Supervisor {
    workers: Arc<Mutex<Vec<Worker>>>,
    info: Vec<WorkerInfo>,
    stopping: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
    /// Holds the sockets; removed with the supervisor.
    _dir: tempfile::TempDir,
}

impl Supervisor {
    /// Spawns the workers of `groups`, hands each group its rendezvous, and waits until every
    /// worker has loaded `init`'s model. Returns one executor per group, in order.
    pub fn launch(
        groups: &[GroupPlan],
        init: &WorkerInit,
        log_level: &str,
    ) -> Result<(Self, Vec<WorkerGroup>)> {
        let dir = tempfile::Builder::new()
            .prefix("liftoff-")
            .tempdir()
            .context("creating the worker socket directory")?;
        let control = dir.path().join("control.sock");
        let listener = UnixListener::bind(&control)
            .with_context(|| format!("binding {}", control.display()))?;
        listener.set_nonblocking(true)?;
        let total: usize = groups.iter().map(|g| g.devices.len()).sum();
        let threads = threads_per_worker(total);
        let exe = std::env::current_exe().context("locating the liftoff binary")?;
        let mut sup = Self {
            workers: Arc::new(Mutex::new(Vec::new())),
            info: Vec::new(),
            stopping: Arc::new(AtomicBool::new(false)),
            watcher: None,
            _dir: dir,
        };
        for (g, plan) in groups.iter().enumerate() {
            for (rank, device) in plan.devices.iter().enumerate() {
                let mut cmd = Command::new(&exe);
                cmd.args(["--log-level", log_level, "worker", "--control"])
                    .arg(&control)
                    .args(["--group", &g.to_string(), "--rank", &rank.to_string()])
                    .args(["--world-size", &plan.devices.len().to_string()])
                    .args(["--device", &device.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    // Its own process group: a terminal's Ctrl-C reaches the launcher, which
                    // then drains and stops the workers in order.
                    .process_group(0);
                if let Some(n) = threads {
                    cmd.env("RAYON_NUM_THREADS", n.to_string());
                }
                let child = spawn_tied_to_process(cmd)
                    .with_context(|| format!("spawning worker g{g}/r{rank}"))?;
                sup.info.push(WorkerInfo {
                    group: g,
                    rank,
                    pid: child.id(),
                    device: device.to_string(),
                });
                sup.lock().push(Worker {
                    group: g,
                    rank,
                    child,
                    exited: false,
                });
            }
        }
        let members = sup.accept_hellos(&listener, groups)?;
        let executors = std::thread::scope(|s| {
            let handles: Vec<_> = members
                .into_iter()
                .map(|m| s.spawn(move || WorkerGroup::initialise(m, init.clone())))
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(g, h)| {
                    h.join()
                        .map_err(|_| anyhow!("replica group {g}: initialisation panicked"))?
                        .map_err(|e| anyhow!("replica group {g}: {e}"))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok((sup, executors))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts every worker's connection and hello, failing fast when one exits first.
    fn accept_hellos(
        &self,
        listener: &UnixListener,
        groups: &[GroupPlan],
    ) -> Result<Vec<Vec<GroupMember>>> {
        let mut members: Vec<Vec<GroupMember>> = groups.iter().map(|_| Vec::new()).collect();
        let total: usize = groups.iter().map(|g| g.devices.len()).sum();
        let deadline = Instant::now() + HELLO_TIMEOUT;
        let mut joined = 0;
        while joined < total {
            match listener.accept() {
                Ok((mut link, _)) => {
                    link.set_nonblocking(false)?;
                    link.set_read_timeout(Some(HELLO_TIMEOUT))?;
                    let hello: FromWorker =
                        protocol::recv(&mut link).context("reading a worker's hello")?;
                    link.set_read_timeout(None)?;
                    let FromWorker::Hello {
                        group,
                        rank,
                        rendezvous,
                    } = hello
                    else {
                        bail!("a worker opened with {hello:?} instead of a hello");
                    };
                    let slot = members
                        .get_mut(group as usize)
                        .ok_or_else(|| anyhow!("a worker claims unknown group {group}"))?;
                    slot.push(GroupMember {
                        rank: rank as usize,
                        link,
                        rendezvous,
                    });
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(why) = self.first_exit() {
                        bail!("{why} before it connected");
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "only {joined} of {total} workers connected within {HELLO_TIMEOUT:?}"
                        );
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("accepting a worker"),
            }
        }
        Ok(members)
    }

    /// "worker gG/rR exited with STATUS" for the first worker found dead, if any.
    fn first_exit(&self) -> Option<String> {
        let mut workers = self.lock();
        for w in workers.iter_mut().filter(|w| !w.exited) {
            if let Ok(Some(status)) = w.child.try_wait() {
                w.exited = true;
                return Some(format!("worker g{}/r{} exited ({status})", w.group, w.rank));
            }
        }
        None
    }

    /// The worker processes.
    pub fn workers(&self) -> &[WorkerInfo] {
        &self.info
    }

    /// Watches the workers: when one exits, its group is marked down (`health[group]` cleared)
    /// and the group's other workers are stopped; the other groups keep serving.
    pub fn watch(&mut self, health: Vec<Arc<AtomicBool>>) {
        let workers = self.workers.clone();
        let stopping = self.stopping.clone();
        self.watcher = Some(std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                let mut ws = workers.lock().unwrap_or_else(|p| p.into_inner());
                let mut down = Vec::new();
                for w in ws.iter_mut().filter(|w| !w.exited) {
                    if let Ok(Some(status)) = w.child.try_wait() {
                        w.exited = true;
                        if !stopping.load(Ordering::SeqCst) {
                            tracing::error!(
                                "worker g{}/r{} (pid {}) exited ({status}): replica group {} is down",
                                w.group,
                                w.rank,
                                w.child.id(),
                                w.group
                            );
                            down.push(w.group);
                        }
                    }
                }
                for g in down {
                    if let Some(flag) = health.get(g) {
                        flag.store(false, Ordering::SeqCst);
                    }
                    for w in ws.iter_mut().filter(|w| w.group == g && !w.exited) {
                        let _ = w.child.kill();
                        let _ = w.child.wait();
                        w.exited = true;
                    }
                }
            }
        }));
    }

    /// Waits up to `grace` for the workers to exit on their own (they do once their group's
    /// executor is dropped), then kills the rest and reaps every one.
    pub fn shutdown(mut self, grace: Duration) {
        self.stop(grace);
    }

    fn stop(&mut self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let deadline = Instant::now() + grace;
        let mut workers = self.lock();
        for w in workers.iter_mut().filter(|w| !w.exited) {
            loop {
                match w.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        tracing::warn!("worker g{}/r{} did not stop; killing it", w.group, w.rank);
                        let _ = w.child.kill();
                        let _ = w.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            w.exited = true;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Error paths end here too: never leave a worker behind.
        self.stop(Duration::from_secs(5));
    }
}

/// Spawns `cmd` so that it dies with this process, even if the process is SIGKILLed
/// (`PR_SET_PDEATHSIG`). The kernel sends that signal when the *thread* that forked the child
/// exits, not the process, so every child is forked by one thread that lives as long as the
/// process: readers load on tokio's blocking threads, which exit after 10 s idle, and a worker
/// forked there would be killed with its thread.
pub fn spawn_tied_to_process(mut cmd: Command) -> std::io::Result<Child> {
    use std::sync::mpsc::{channel, Sender};
    use std::sync::OnceLock;
    type Job = (Command, Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Result<Mutex<Sender<Job>>, String>> = OnceLock::new();
    // SAFETY: the closure only makes the prctl system call, which is async-signal-safe,
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let spawner = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = channel::<Job>();
            std::thread::Builder::new()
                .name("worker-spawner".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                })
                .map(|_| Mutex::new(tx))
                .map_err(|e| format!("starting the worker-spawner thread: {e}"))
        })
        .as_ref()
        .map_err(|e| std::io::Error::other(e.clone()))?;
    let (reply, answer) = channel();
    let sent = spawner
        .lock()
        .map_err(|_| std::io::Error::other("the worker spawner is poisoned"))?
        .send((cmd, reply));
    sent.map_err(|_| std::io::Error::other("the worker spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the worker spawner thread is gone"))?
}

/// CPU threads per worker: the machine's cores shared out, unless `RAYON_NUM_THREADS` is set.
fn threads_per_worker(total: usize) -> Option<usize> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / total.max(1)).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(child: &mut Child) -> bool {
        child.try_wait().map(|s| s.is_none()).unwrap_or(false)
    }

    /// A reader loads on a short-lived thread; its workers must outlive that thread.
    #[test]
    fn a_worker_outlives_the_thread_that_spawned_it() {
        let mut tied = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            spawn_tied_to_process(cmd)
        })
        .join()
        .unwrap()
        .unwrap();
        // The control: PDEATHSIG set and forked on the short-lived thread itself.
        let mut direct = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            // SAFETY: only the prctl system call between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                        .map_err(std::io::Error::from)
                });
            }
            cmd.spawn()
        })
        .join()
        .unwrap()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(&mut direct) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !alive(&mut direct),
            "the control child should die with its thread"
        );
        assert!(
            alive(&mut tied),
            "the worker died with the thread that asked for it"
        );
        tied.kill().unwrap();
        tied.wait().unwrap();
    }
}
