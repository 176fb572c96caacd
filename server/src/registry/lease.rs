//! Requests leasing readers: the lease that keeps a reader loaded, and the choice of a
//! reader for a request (or the wait for one to load).

use super::*;

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
pub(super) struct Waiting {
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

/// What a request does next for its reader.
pub(super) enum Next {
    Wait(Arc<Usage>),
    Fail(ApiError),
}

impl Registry {
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
    pub(super) fn next_step(
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
}

/// The entries a request for `target` may use (not being deleted).
pub(super) fn candidates(entries: &[Entry], target: Target) -> Vec<usize> {
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

pub(super) fn not_found(target: Target, field: &str) -> ApiError {
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
