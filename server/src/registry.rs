//! The readers a server knows. Each is a model in a consumer group, in one of the states
//! `loading`, `ready`, `unloaded`, `failed`, `stopping`. Requests lease a ready reader, and a
//! reader with a lease (or a request waiting for it) is never unloaded. Loads fit a memory
//! budget per device by unloading the least recently used idle, unpinned readers first; a
//! request for an unloaded reader loads it again and waits.

use crate::error::ApiError;
use crate::metrics::{Metrics, ReaderLabels};
use crate::service::ModelService;
use serde::Serialize;
use serde_json::{json, Value};
use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Where a reader is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReaderState {
    Loading,
    Ready,
    Unloaded,
    Failed,
    Stopping,
}

impl ReaderState {
    /// Every state, in the order metrics list them.
    pub const ALL: [ReaderState; 5] = [
        Self::Loading,
        Self::Ready,
        Self::Unloaded,
        Self::Failed,
        Self::Stopping,
    ];

    /// The name the APIs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Loading => "loading",
            Self::Ready => "ready",
            Self::Unloaded => "unloaded",
            Self::Failed => "failed",
            Self::Stopping => "stopping",
        }
    }
}

/// What a reader is, checked and with its defaults filled in; enough to load it (again).
pub struct ReaderSpec {
    /// The id asked for (else one is made up).
    pub reader_id: Option<String>,
    pub model_name: String,
    pub consumer_group: String,
    /// The memory pool the reader draws from (`cpu`, `cuda:0`, ...).
    pub device: String,
    /// Never unloaded to make room.
    pub pinned: bool,
    /// The footprint expected before the first load (weights and KV cache, bytes).
    pub estimate_bytes: u64,
    /// The effective configuration, as `GET /config/{reader_id}` shows it.
    pub config: Value,
    /// The loader's own description of the reader.
    pub args: Arc<dyn Any + Send + Sync>,
}

/// A loaded reader.
pub struct LoadedReader {
    pub service: ModelService,
    /// Measured footprint: weights and KV cache of every rank, bytes.
    pub memory_bytes: u64,
    /// Stops the reader's worker processes (called once its schedulers have ended).
    pub stop: Box<dyn FnOnce() + Send>,
}

/// Turns reader configurations into running readers (the launcher implements it).
pub trait ReaderLoader: Send + Sync {
    /// Checks a `POST /reader` body and fills in defaults, reading no weights; errors are
    /// 400s naming the field (403 for a model outside the allowed roots).
    fn prepare(&self, body: &serde_json::Map<String, Value>) -> Result<ReaderSpec, ApiError>;
    /// Loads a reader; blocking (the registry runs it on a blocking thread).
    fn load(&self, spec: &ReaderSpec) -> Result<LoadedReader, String>;
    /// The memory all readers on `device` may use together; `None`: no budget.
    fn budget(&self, device: &str) -> Option<u64>;
    /// Called once an unloaded or deleted reader's memory is freed (to hand it back to the
    /// system).
    fn released(&self) {}
}

/// Limits of the registry's waits.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Longest a request waits for its reader to load.
    pub load_timeout: Duration,
    /// Longest a deleted reader's in-flight requests may take before they get 503s.
    pub drain_timeout: Duration,
    /// Requests that may wait for one reader to load; more get 503s.
    pub max_waiting: usize,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            load_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(30),
            max_waiting: 256,
        }
    }
}

/// How busy a reader is; shared with its leases.
#[derive(Default)]
struct Usage {
    /// Leases held, and requests waiting for the reader to load.
    in_flight: AtomicUsize,
    /// Requests waiting for the reader to load.
    waiting: AtomicUsize,
    /// Milliseconds since the Unix epoch at the last use.
    last_used_ms: AtomicU64,
}

impl Usage {
    fn touch(&self) {
        self.last_used_ms.store(unix_ms(), Ordering::Relaxed);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Entry {
    id: String,
    /// Unique for the registry's life (an id may be reused after a delete).
    serial: u64,
    /// Whether its weights and KV cache are in memory (loaded, or still being freed).
    holds: bool,
    spec: ReaderSpec,
    state: ReaderState,
    /// Set once a delete began: the reader takes no new requests.
    deleting: bool,
    service: Option<Arc<ModelService>>,
    stop: Option<Box<dyn FnOnce() + Send>>,
    /// The measured footprint of the last load (until then, the estimate).
    memory_bytes: u64,
    /// Why it failed, or why the last load was refused.
    error: Option<String>,
    /// When a load was last refused for lack of memory (requests waiting since then fail).
    refused_at: Option<Instant>,
    usage: Arc<Usage>,
    labels: ReaderLabels,
    /// Whether it was ever loaded (a refused reload leaves it `unloaded`, not `failed`).
    loaded_once: bool,
}

impl Entry {
    /// Ready and with a serving replica group.
    fn serving(&self) -> bool {
        self.state == ReaderState::Ready && self.service.as_ref().is_some_and(|s| s.is_healthy())
    }

    fn evictable(&self) -> bool {
        self.state == ReaderState::Ready
            && !self.deleting
            && !self.spec.pinned
            && self.usage.in_flight.load(Ordering::SeqCst) == 0
    }
}

/// A reader leased to a request: it stays loaded while any clone lives.
#[derive(Clone)]
pub struct Lease(Arc<LeaseInner>);

struct LeaseInner {
    service: Arc<ModelService>,
    usage: Arc<Usage>,
    /// Told when the lease ends (a load may be waiting for the reader to go idle).
    changed: watch::Sender<u64>,
    labels: ReaderLabels,
    /// How long the request waited for the reader to load.
    waited: Duration,
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        self.usage.touch();
        if self.usage.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

impl Lease {
    /// The leased reader's model.
    pub fn service(&self) -> &Arc<ModelService> {
        &self.0.service
    }

    /// The reader's metric labels.
    pub fn labels(&self) -> &ReaderLabels {
        &self.0.labels
    }

    /// How long the request waited for the reader to load.
    pub fn waited(&self) -> Duration {
        self.0.waited
    }
}

/// Counts a request as waiting for a reader until dropped.
struct Waiting {
    usage: Arc<Usage>,
    changed: watch::Sender<u64>,
}

impl Waiting {
    fn new(usage: Arc<Usage>, changed: watch::Sender<u64>) -> Self {
        usage.in_flight.fetch_add(1, Ordering::SeqCst);
        usage.waiting.fetch_add(1, Ordering::SeqCst);
        Self { usage, changed }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.usage.waiting.fetch_sub(1, Ordering::SeqCst);
        if self.usage.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The reader may now be unloaded: a load may wait for that.
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

/// Which readers a request may go to.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Takeoff's default: the `primary` consumer group, else the first reader's group.
    Default,
    /// A reader id, a consumer group or a model name, tried in that order.
    Key(&'a str),
}

/// What a request does next for its reader.
enum Next {
    Wait(Arc<Usage>),
    Fail(ApiError),
}

/// The server's readers.
pub struct Registry {
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
    serials: AtomicU64,
    loader: Option<Arc<dyn ReaderLoader>>,
    /// One load at a time: each sees the memory the previous one took.
    load_lock: tokio::sync::Mutex<()>,
    changed: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    pub options: RegistryOptions,
}

impl Registry {
    /// An empty registry; without a loader, readers can only be added already loaded.
    pub fn new(
        loader: Option<Arc<dyn ReaderLoader>>,
        metrics: Arc<Metrics>,
        options: RegistryOptions,
    ) -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            serials: AtomicU64::new(0),
            loader,
            load_lock: tokio::sync::Mutex::new(()),
            changed: watch::channel(0).0,
            metrics,
            options,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The loader, for checking `POST /reader` bodies.
    pub fn loader(&self) -> Option<&Arc<dyn ReaderLoader>> {
        self.loader.as_ref()
    }

    /// A fresh reader id: `id` when given and free, else `<model>-<n>`.
    fn new_id(&self, entries: &[Entry], wanted: Option<&str>, model: &str) -> String {
        if let Some(w) = wanted.filter(|w| !entries.iter().any(|e| e.id == *w)) {
            return w.to_string();
        }
        let stem: String = model
            .rsplit('/')
            .next()
            .unwrap_or(model)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        loop {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed);
            let id = format!("{stem}-{n}");
            if !entries.iter().any(|e| e.id == id) {
                return id;
            }
        }
    }

    fn entry(&self, spec: ReaderSpec, id: String, state: ReaderState) -> Entry {
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        let labels = ReaderLabels {
            reader_id: id.clone(),
            model: spec.model_name.clone(),
            consumer_group: spec.consumer_group.clone(),
        };
        let usage = Arc::new(Usage::default());
        usage.touch();
        Entry {
            id,
            serial,
            holds: false,
            memory_bytes: spec.estimate_bytes,
            spec,
            state,
            deleting: false,
            service: None,
            stop: None,
            error: None,
            refused_at: None,
            usage,
            labels,
            loaded_once: false,
        }
    }

    /// Adds a reader that is already loaded (a server without a loader, or tests).
    pub fn insert_loaded(
        &self,
        spec: ReaderSpec,
        loaded: LoadedReader,
        id: Option<&str>,
    ) -> String {
        let mut entries = self.lock();
        let id = self.new_id(&entries, id, &spec.model_name);
        let mut e = self.entry(spec, id.clone(), ReaderState::Ready);
        e.memory_bytes = loaded.memory_bytes;
        e.service = Some(Arc::new(loaded.service));
        e.stop = Some(loaded.stop);
        e.loaded_once = true;
        e.holds = true;
        entries.push(e);
        drop(entries);
        self.notify();
        id
    }

    /// Registers a reader and loads it in the background; answers its id at once. A load that
    /// cannot fit the budget even with every idle reader unloaded is refused here (503).
    pub fn add(self: &Arc<Self>, spec: ReaderSpec) -> Result<String, ApiError> {
        let mut entries = self.lock();
        if let Some(w) = &spec.reader_id {
            if entries.iter().any(|e| e.id == *w) {
                return Err(ApiError::invalid(
                    "reader_id",
                    format!("a reader '{w}' exists already"),
                ));
            }
        }
        if let Some(budget) = self.budget(&spec.device) {
            let need = spec.estimate_bytes;
            let pinned_or_busy = held(&entries, &spec.device, None, |e| !e.evictable());
            if pinned_or_busy + need > budget {
                return Err(ApiError::unavailable(
                    refusal(&entries, &spec.device, budget, need, &spec.model_name),
                    None,
                ));
            }
        }
        let id = self.new_id(&entries, spec.reader_id.as_deref(), &spec.model_name);
        let e = self.entry(spec, id.clone(), ReaderState::Loading);
        let serial = e.serial;
        entries.push(e);
        drop(entries);
        self.spawn_load(serial);
        self.notify();
        Ok(id)
    }

    fn budget(&self, device: &str) -> Option<u64> {
        self.loader.as_ref().and_then(|l| l.budget(device))
    }

    /// Waits until reader `id` is ready (`Ok`) or failed or gone (`Err` with why).
    pub async fn wait_loaded(&self, id: &str) -> Result<(), String> {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let entries = self.lock();
                match entries.iter().find(|e| e.id == id) {
                    None => return Err(format!("reader {id} was deleted")),
                    Some(e) if e.state == ReaderState::Ready => return Ok(()),
                    Some(e) if e.state == ReaderState::Failed => {
                        return Err(e.error.clone().unwrap_or_default())
                    }
                    Some(e) if e.state == ReaderState::Unloaded && e.refused_at.is_some() => {
                        return Err(e.error.clone().unwrap_or_default())
                    }
                    Some(_) => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err("the server is stopping".into());
            }
        }
    }

    fn spawn_load(self: &Arc<Self>, serial: u64) {
        let this = self.clone();
        tokio::spawn(async move { this.run_load(serial).await });
    }

    /// Loads the reader numbered `serial` (in state `loading`), unloading idle readers first
    /// to make room.
    async fn run_load(self: Arc<Self>, serial: u64) {
        let Some(loader) = self.loader.clone() else {
            return;
        };
        let id = match self.lock().iter().find(|e| e.serial == serial) {
            Some(e) => e.id.clone(),
            None => return,
        };
        let deadline = Instant::now() + self.options.load_timeout;
        let mut rx = self.changed.subscribe();
        let _one_at_a_time = loop {
            let guard = self.load_lock.lock().await;
            let why = match self.make_room(serial).await {
                Ok(()) => break guard,
                // Readers with requests in flight may free the room: wait for one to finish
                // (with the load lock released) while the load may still be waited for.
                Err(Refusal::Busy(why)) if Instant::now() < deadline => {
                    drop(guard);
                    let left = deadline.saturating_duration_since(Instant::now());
                    let _ = tokio::time::timeout(left, rx.changed()).await;
                    if self.wanted(serial) {
                        continue;
                    }
                    why
                }
                Err(Refusal::Busy(why) | Refusal::Impossible(why)) => why,
            };
            let mut entries = self.lock();
            if let Some(e) = entries
                .iter_mut()
                .find(|e| e.serial == serial && !e.deleting)
            {
                tracing::warn!("reader {id}: {why}");
                // A reader that was loaded before goes back to `unloaded`: a later request
                // may find room.
                e.state = if e.loaded_once {
                    ReaderState::Unloaded
                } else {
                    ReaderState::Failed
                };
                e.error = Some(why);
                e.refused_at = Some(Instant::now());
                self.metrics.reader_failure(&e.labels);
            }
            drop(entries);
            self.notify();
            return;
        };
        let spec = {
            let entries = self.lock();
            match entries.iter().find(|e| e.serial == serial && !e.deleting) {
                Some(e) => clone_spec(&e.spec),
                None => return,
            }
        };
        let started = Instant::now();
        tracing::info!("loading reader {id} ({})", spec.model_name);
        let result = tokio::task::spawn_blocking(move || loader.load(&spec))
            .await
            .unwrap_or_else(|e| Err(format!("the load panicked: {e}")));
        let secs = started.elapsed().as_secs_f64();
        let orphan = {
            let mut entries = self.lock();
            match entries
                .iter_mut()
                .find(|e| e.serial == serial && !e.deleting)
            {
                // Deleted while it loaded: what was loaded is stopped below.
                None => result.ok(),
                Some(e) => {
                    match result {
                        Ok(loaded) => {
                            tracing::info!(
                                "reader {id} ready in {secs:.1} s ({} MiB)",
                                loaded.memory_bytes >> 20
                            );
                            e.state = ReaderState::Ready;
                            e.memory_bytes = loaded.memory_bytes;
                            e.service = Some(Arc::new(loaded.service));
                            e.stop = Some(loaded.stop);
                            e.error = None;
                            e.refused_at = None;
                            e.loaded_once = true;
                            e.holds = true;
                            self.metrics.reader_loaded(&e.labels, secs);
                        }
                        Err(why) => {
                            tracing::error!("reader {id} failed to load: {why}");
                            e.state = ReaderState::Failed;
                            e.error = Some(why);
                            self.metrics.reader_failure(&e.labels);
                        }
                    }
                    None
                }
            }
        };
        if let Some(loaded) = orphan {
            self.shutdown(Arc::new(loaded.service), loaded.stop, false)
                .await;
        }
        self.notify();
    }

    /// Unloads least recently used idle readers on the device of reader `serial` until it
    /// fits the budget; unloads nothing when even that would not make room.
    async fn make_room(&self, serial: u64) -> Result<(), Refusal> {
        loop {
            let (victim, service, stop) = {
                let mut entries = self.lock();
                let Some(me) = entries.iter().find(|e| e.serial == serial) else {
                    return Ok(());
                };
                let device = me.spec.device.clone();
                let need = me.memory_bytes;
                let name = me.spec.model_name.clone();
                let Some(budget) = self.budget(&device) else {
                    return Ok(());
                };
                let others = |keep: fn(&Entry) -> bool| held(&entries, &device, Some(serial), keep);
                if others(|_| true) + need <= budget {
                    return Ok(());
                }
                // What stays whatever is unloaded: pinned readers always, busy ones for now.
                let pinned = others(|e| e.spec.pinned);
                let kept = others(|e| !e.evictable());
                if kept + need > budget {
                    let why = refusal(&entries, &device, budget, need, &name);
                    return Err(if pinned + need > budget {
                        Refusal::Impossible(why)
                    } else {
                        Refusal::Busy(why)
                    });
                }
                let Some(v) = entries
                    .iter_mut()
                    .filter(|e| e.serial != serial && e.spec.device == device && e.evictable())
                    .min_by_key(|e| e.usage.last_used_ms.load(Ordering::Relaxed))
                else {
                    return Ok(());
                };
                tracing::info!(
                    "unloading reader {} ({} MiB, idle) to make room for {name}",
                    v.id,
                    v.memory_bytes >> 20
                );
                v.state = ReaderState::Stopping;
                (v.serial, v.service.take(), v.stop.take())
            };
            self.notify();
            if let Some(service) = service {
                self.shutdown(service, stop.unwrap_or_else(|| Box::new(|| {})), false)
                    .await;
            }
            let mut entries = self.lock();
            if let Some(v) = entries.iter_mut().find(|e| e.serial == victim) {
                v.holds = false;
                if !v.deleting {
                    v.state = ReaderState::Unloaded;
                }
                self.metrics.reader_unloaded(&v.labels);
            }
            drop(entries);
            self.notify();
        }
    }

    /// Whether reader `serial` is still to be loaded: not deleted, and a first load or one
    /// that a request waits for.
    fn wanted(&self, serial: u64) -> bool {
        self.lock().iter().any(|e| {
            e.serial == serial
                && !e.deleting
                && (!e.loaded_once || e.usage.waiting.load(Ordering::SeqCst) > 0)
        })
    }

    /// Ends a reader's schedulers (`abort`: at once, ending their requests with 503, which
    /// also wakes an idle one; else once their last handle is gone) and its worker
    /// processes, and waits until the schedulers' threads have freed the model.
    async fn shutdown(
        &self,
        service: Arc<ModelService>,
        stop: Box<dyn FnOnce() + Send>,
        abort: bool,
    ) {
        // The supervisor first learns that the workers are to exit (so their exit is not
        // taken for a failure), then waits for them while the schedulers end.
        let stopping = tokio::task::spawn_blocking(stop);
        let alive: Vec<Arc<AtomicBool>> =
            service.replicas.iter().map(|r| r.health_flag()).collect();
        if abort {
            for r in &service.replicas {
                r.abort();
            }
        }
        // The last handle gone, an idle scheduler thread ends.
        drop(service);
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive.iter().any(|a| a.load(Ordering::SeqCst)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stopping.await;
        if let Some(l) = &self.loader {
            l.released();
        }
    }

    /// Leases a serving reader for `target`: the one with the fewest requests among the
    /// matching ready readers, else it waits for one to load (loading an unloaded one).
    pub async fn acquire(
        self: &Arc<Self>,
        target: Target<'_>,
        field: &str,
    ) -> Result<Lease, ApiError> {
        let started = Instant::now();
        let deadline = started + self.options.load_timeout;
        let mut rx = self.changed.subscribe();
        let mut waiting: Option<Waiting> = None;
        loop {
            let next = {
                let mut entries = self.lock();
                let matches = candidates(&entries, target);
                if matches.is_empty() {
                    return Err(not_found(target, field));
                }
                if let Some(&i) = matches
                    .iter()
                    .filter(|&&i| entries[i].serving())
                    .min_by_key(|&&i| entries[i].usage.in_flight.load(Ordering::SeqCst))
                {
                    let e = &entries[i];
                    let (Some(service), usage) = (e.service.clone(), e.usage.clone()) else {
                        continue;
                    };
                    usage.in_flight.fetch_add(1, Ordering::SeqCst);
                    usage.touch();
                    self.metrics.reader_request(&e.labels);
                    return Ok(Lease(Arc::new(LeaseInner {
                        service,
                        usage,
                        changed: self.changed.clone(),
                        labels: e.labels.clone(),
                        waited: started.elapsed(),
                    })));
                }
                let next = self.next_step(&mut entries, &matches, started);
                // Counted as waiting before the lock is released, so the reader is not
                // unloaded the moment it is ready.
                if let Next::Wait(usage) = &next {
                    if waiting
                        .as_ref()
                        .is_none_or(|w| !Arc::ptr_eq(&w.usage, usage))
                    {
                        if usage.waiting.load(Ordering::SeqCst) >= self.options.max_waiting {
                            return Err(ApiError::unavailable(
                                format!(
                                    "{} requests already wait for this reader to load; retry later",
                                    self.options.max_waiting
                                ),
                                Some(5),
                            ));
                        }
                        waiting = Some(Waiting::new(usage.clone(), self.changed.clone()));
                    }
                }
                next
            };
            if let Next::Fail(err) = next {
                return Err(err);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ApiError::unavailable("the server is stopping", None)),
                Err(_) => {
                    return Err(ApiError::unavailable(
                        format!(
                            "the reader did not load within {} s",
                            self.options.load_timeout.as_secs()
                        ),
                        Some(5),
                    ))
                }
            }
        }
    }

    /// No matching reader serves: wait for one that loads or unloads, start loading an
    /// unloaded one, or fail.
    fn next_step(
        self: &Arc<Self>,
        entries: &mut [Entry],
        matches: &[usize],
        since: Instant,
    ) -> Next {
        if let Some(&i) = matches.iter().find(|&&i| {
            matches!(
                entries[i].state,
                ReaderState::Loading | ReaderState::Stopping
            )
        }) {
            return Next::Wait(entries[i].usage.clone());
        }
        if let Some(&i) = matches
            .iter()
            .filter(|&&i| entries[i].state == ReaderState::Unloaded)
            .max_by_key(|&&i| entries[i].usage.last_used_ms.load(Ordering::Relaxed))
        {
            let e = &mut entries[i];
            if let Some(why) = e.refused_at.filter(|t| *t > since).and(e.error.clone()) {
                self.metrics.reader_failure(&e.labels);
                return Next::Fail(ApiError::unavailable(why, Some(5)));
            }
            e.state = ReaderState::Loading;
            let usage = e.usage.clone();
            self.spawn_load(e.serial);
            self.notify();
            return Next::Wait(usage);
        }
        // Failed, or ready with every replica group down.
        let e = &entries[matches[0]];
        self.metrics.reader_failure(&e.labels);
        let why = match (&e.state, &e.error) {
            (ReaderState::Failed, Some(err)) => format!("reader {} failed to load: {err}", e.id),
            _ => format!("reader {} has no healthy replica group", e.id),
        };
        Next::Fail(ApiError::unavailable(why, Some(5)))
    }

    /// Deletes reader `id`: it takes no new requests, its in-flight ones finish (up to the
    /// drain timeout, then they end with 503), its workers stop and its memory is freed.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<(), ApiError> {
        // Runs to its end even if the client goes away meanwhile.
        let (this, id) = (self.clone(), id.to_string());
        tokio::spawn(async move { this.delete_now(&id).await })
            .await
            .unwrap_or_else(|e| {
                Err(ApiError::internal(format!(
                    "deleting the reader failed: {e}"
                )))
            })
    }

    async fn delete_now(&self, id: &str) -> Result<(), ApiError> {
        let (serial, usage) = {
            let mut entries = self.lock();
            let e = entries
                .iter_mut()
                .find(|e| e.id == id && !e.deleting)
                .ok_or_else(|| ApiError::not_found("reader_id", format!("no reader '{id}'")))?;
            e.deleting = true;
            e.state = ReaderState::Stopping;
            (e.serial, e.usage.clone())
        };
        self.notify();
        let deadline = Instant::now() + self.options.drain_timeout;
        while usage.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The entry stays (stopping, its memory counted) until the memory is freed.
        let (service, stop) = {
            let mut entries = self.lock();
            match entries.iter_mut().find(|e| e.serial == serial) {
                Some(e) => (e.service.take(), e.stop.take()),
                None => (None, None),
            }
        };
        if let Some(service) = service {
            // Requests still running after the drain end with 503; an idle scheduler wakes.
            self.shutdown(service, stop.unwrap_or_else(|| Box::new(|| {})), true)
                .await;
        }
        let removed = {
            let mut entries = self.lock();
            let pos = entries.iter().position(|e| e.serial == serial);
            pos.map(|p| entries.remove(p))
        };
        if let Some(e) = removed {
            self.metrics.forget_reader(&e.labels);
        }
        tracing::info!("reader {id} deleted");
        self.notify();
        Ok(())
    }

    /// Takes every reader out (server shutdown): ends their schedulers and workers.
    pub async fn shutdown_all(&self) {
        let taken: Vec<_> = {
            let mut entries = self.lock();
            entries
                .iter_mut()
                .filter_map(|e| Some((e.service.take()?, e.stop.take())))
                .collect()
        };
        for (service, stop) in taken {
            self.shutdown(service, stop.unwrap_or_else(|| Box::new(|| {})), false)
                .await;
        }
    }

    /// The loaded models, in registration order.
    pub fn services(&self) -> Vec<Arc<ModelService>> {
        self.lock()
            .iter()
            .filter(|e| !e.deleting)
            .filter_map(|e| e.service.clone())
            .collect()
    }

    /// A snapshot of every reader, in registration order.
    pub fn readers(&self) -> Vec<ReaderView> {
        self.lock()
            .iter()
            .filter(|e| !e.deleting || e.service.is_some())
            .map(|e| ReaderView {
                reader_id: e.id.clone(),
                model_name: e.spec.model_name.clone(),
                device: e.spec.device.clone(),
                consumer_group: e.spec.consumer_group.clone(),
                ready: e.serving(),
                state: e.state,
                pids: e.service.as_ref().map_or_else(Vec::new, |s| {
                    if s.info.workers.is_empty() {
                        vec![std::process::id()]
                    } else {
                        s.info.workers.iter().map(|w| w.pid).collect()
                    }
                }),
                memory_bytes: e.service.as_ref().map_or(0, |_| e.memory_bytes),
                pinned: e.spec.pinned,
                last_used: e.usage.last_used_ms.load(Ordering::Relaxed) as f64 / 1e3,
                in_flight: e.usage.in_flight.load(Ordering::SeqCst),
                replicas_healthy: e.service.as_ref().map_or_else(Vec::new, |s| {
                    s.replicas.iter().map(|r| r.is_alive()).collect()
                }),
                max_sequence_length: e.service.as_ref().map(|s| s.info.max_sequence_length),
                error: e.error.clone(),
                labels: e.labels.clone(),
            })
            .collect()
    }

    /// The effective configuration of reader `id`.
    pub fn config(&self, id: &str) -> Option<Value> {
        let entries = self.lock();
        let e = entries.iter().find(|e| e.id == id)?;
        let mut c = e.spec.config.clone();
        if let Value::Object(m) = &mut c {
            m.insert("reader_id".into(), json!(e.id));
            m.insert("pinned".into(), json!(e.spec.pinned));
        }
        Some(c)
    }
}

/// Why a load found no room.
enum Refusal {
    /// Readers with requests in flight hold the memory; it may free up.
    Busy(String),
    /// Pinned readers alone leave too little.
    Impossible(String),
}

/// A reader as the management API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ReaderView {
    pub reader_id: String,
    pub model_name: String,
    pub device: String,
    pub consumer_group: String,
    pub ready: bool,
    pub state: ReaderState,
    pub pids: Vec<u32>,
    /// Measured footprint while loaded (weights and KV cache); 0 when not loaded.
    pub memory_bytes: u64,
    pub pinned: bool,
    /// Unix time of the last request, seconds.
    pub last_used: f64,
    /// Requests holding or waiting for the reader.
    pub in_flight: usize,
    /// Whether each replica group serves (empty when not loaded).
    #[serde(skip)]
    pub replicas_healthy: Vec<bool>,
    /// Longest prompt + output, while loaded.
    #[serde(skip)]
    pub max_sequence_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub labels: ReaderLabels,
}

/// Memory held on `device` by the readers that `keep` picks (all but reader `except`).
fn held(entries: &[Entry], device: &str, except: Option<u64>, keep: fn(&Entry) -> bool) -> u64 {
    entries
        .iter()
        .filter(|e| e.spec.device == device && e.holds && Some(e.serial) != except && keep(e))
        .map(|e| e.memory_bytes)
        .sum()
}

/// The entries a request for `target` may use (not being deleted).
fn candidates(entries: &[Entry], target: Target) -> Vec<usize> {
    let live = |e: &&Entry| !e.deleting;
    let pick = |f: &dyn Fn(&Entry) -> bool| -> Vec<usize> {
        entries
            .iter()
            .enumerate()
            .filter(|(_, e)| live(e) && f(e))
            .map(|(i, _)| i)
            .collect()
    };
    match target {
        Target::Default => {
            let primary = pick(&|e| e.spec.consumer_group == "primary");
            if !primary.is_empty() {
                return primary;
            }
            match entries.iter().find(|e| !e.deleting) {
                Some(first) => {
                    let g = first.spec.consumer_group.clone();
                    pick(&|e| e.spec.consumer_group == g)
                }
                None => Vec::new(),
            }
        }
        Target::Key(k) => {
            let by_id = |e: &Entry| e.id == k;
            let by_group = |e: &Entry| e.spec.consumer_group == k;
            let by_model = |e: &Entry| e.spec.model_name == k;
            let ways: [&dyn Fn(&Entry) -> bool; 3] = [&by_id, &by_group, &by_model];
            ways.iter()
                .map(|f| pick(*f))
                .find(|found| !found.is_empty())
                .unwrap_or_default()
        }
    }
}

fn not_found(target: Target, field: &str) -> ApiError {
    let what = match target {
        Target::Default => "no reader serves the primary consumer group".to_string(),
        Target::Key(k) => match field {
            "model" => format!("the model '{k}' does not exist"),
            "consumer_group" => format!("no reader serves consumer group '{k}'"),
            _ => format!("no reader '{k}'"),
        },
    };
    ApiError::not_found(field, what)
}

/// Why a load does not fit: the budget, what it needs, and each reader's footprint and use.
fn refusal(entries: &[Entry], device: &str, budget: u64, need: u64, name: &str) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let readers: Vec<String> = entries
        .iter()
        .filter(|e| e.spec.device == device && e.holds)
        .map(|e| {
            let why = if e.spec.pinned {
                "pinned".to_string()
            } else if e.state == ReaderState::Stopping {
                "stopping".to_string()
            } else {
                format!(
                    "{} requests in flight",
                    e.usage.in_flight.load(Ordering::SeqCst)
                )
            };
            format!("{} {:.0} MiB ({why})", e.id, mib(e.memory_bytes))
        })
        .collect();
    format!(
        "not enough memory on {device} for {name}: it needs {:.0} MiB, the budget (--models-memory-mib) is {:.0} MiB, and no reader can be unloaded; loaded: [{}]",
        mib(need),
        mib(budget),
        readers.join(", ")
    )
}

/// A copy of a spec for the loading thread.
fn clone_spec(s: &ReaderSpec) -> ReaderSpec {
    ReaderSpec {
        reader_id: s.reader_id.clone(),
        model_name: s.model_name.clone(),
        consumer_group: s.consumer_group.clone(),
        device: s.device.clone(),
        pinned: s.pinned,
        estimate_bytes: s.estimate_bytes,
        config: s.config.clone(),
        args: s.args.clone(),
    }
}
