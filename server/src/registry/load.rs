//! Loading and unloading readers: loads that make room within a device's budget by unloading
//! the least recently used idle readers, deletion and shutdown.

use super::*;

impl Registry {
    pub(super) fn spawn_load(self: &Arc<Self>, serial: u64) {
        let this = self.clone();
        tokio::spawn(async move { this.run_load(serial).await });
    }

    /// Loads the reader numbered `serial` (in state `loading`), unloading idle readers first
    /// to make room.
    pub(super) async fn run_load(self: Arc<Self>, serial: u64) {
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
    pub(super) async fn make_room(&self, serial: u64) -> Result<(), Refusal> {
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
    pub(super) fn wanted(&self, serial: u64) -> bool {
        self.lock().iter().any(|e| {
            e.serial == serial
                && !e.deleting
                && (!e.loaded_once || e.usage.waiting.load(Ordering::SeqCst) > 0)
        })
    }

    /// Ends a reader's schedulers (`abort`: at once, ending their requests with 503, which
    /// also wakes an idle one; else once their last handle is gone) and its worker
    /// processes, and waits until the schedulers' threads have freed the model.
    pub(super) async fn shutdown(
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

    pub(super) async fn delete_now(&self, id: &str) -> Result<(), ApiError> {
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
}

/// Why a load found no room.
pub(super) enum Refusal {
    /// Readers with requests in flight hold the memory; it may free up.
    Busy(String),
    /// Pinned readers alone leave too little.
    Impossible(String),
}

/// Memory held on `device` by the readers that `keep` picks (all but reader `except`).
pub(super) fn held(
    entries: &[Entry],
    device: &str,
    except: Option<u64>,
    keep: fn(&Entry) -> bool,
) -> u64 {
    entries
        .iter()
        .filter(|e| e.spec.device == device && e.holds && Some(e.serial) != except && keep(e))
        .map(|e| e.memory_bytes)
        .sum()
}

/// Why a load does not fit: the budget, what it needs, and each reader's footprint and use.
pub(super) fn refusal(
    entries: &[Entry],
    device: &str,
    budget: u64,
    need: u64,
    name: &str,
) -> String {
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
pub(super) fn clone_spec(s: &ReaderSpec) -> ReaderSpec {
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
