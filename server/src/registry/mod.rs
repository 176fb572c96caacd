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

mod lease;
mod load;

pub use lease::Lease;
use load::{held, refusal};

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

/// Which readers a request may go to.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Takeoff's default: the `primary` consumer group, else the first reader's group.
    Default,
    /// A reader id, a consumer group or a model name, tried in that order.
    Key(&'a str),
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
