//! Stop sequences over streamed text: text that could still become a stop sequence is held
//! back, so a stream never shows part of a stop string.

/// Watches the text of one sequence for its stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopChecker {
    stops: Vec<String>,
    pending: String,
}

/// What a piece of text did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to emit now.
    pub emit: String,
    /// A stop string was found (the text up to it is in `emit`).
    pub stopped: bool,
}

impl StopChecker {
    /// A checker for `stops` (may be empty).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    /// Adds decoded text.
    pub fn push(&mut self, piece: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome {
                emit: piece.to_string(),
                stopped: false,
            };
        }
        self.pending.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome {
                emit,
                stopped: true,
            };
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let emit = self.pending[..hold].to_string();
        self.pending.drain(..hold);
        StopOutcome {
            emit,
            stopped: false,
        }
    }

    /// Text held back, released when the sequence ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let mut c = StopChecker::new(vec!["\n\nUser:".into()]);
        assert_eq!(c.push("Hello").emit, "Hello");
        assert_eq!(c.push(" world\n").emit, " world");
        let o = c.push("\nUs");
        assert_eq!(
            o,
            StopOutcome {
                emit: String::new(),
                stopped: false
            }
        );
        let o = c.push("er: hi");
        assert_eq!(
            o,
            StopOutcome {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn releases_false_alarms_and_flushes() {
        let mut c = StopChecker::new(vec!["STOP".into()]);
        assert_eq!(c.push("ST").emit, "");
        assert_eq!(c.push("ay").emit, "STay");
        assert_eq!(c.push(" ST").emit, " ");
        assert_eq!(c.flush(), "ST");
    }

    #[test]
    fn earliest_stop_wins_inside_one_piece() {
        let mut c = StopChecker::new(vec!["b".into(), "a".into()]);
        assert_eq!(c.push("xxab").emit, "xx");
    }
}
