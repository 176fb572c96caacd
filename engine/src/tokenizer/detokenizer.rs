//! Incremental detokenization: turns a growing list of ids into text pieces that are always
//! valid UTF-8, holding back bytes until a character is complete.

use super::Tokenizer;
use crate::error::Result;

/// Decodes a sequence token by token.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder whose context starts with `prompt_ids` (they are not emitted); a few prompt
    /// tokens give the tokenizer the context it needs to decode the first new token.
    pub fn new(prompt_ids: &[u32]) -> Self {
        let keep = prompt_ids.len().min(5);
        let ids = prompt_ids[prompt_ids.len() - keep..].to_vec();
        Self {
            prefix_offset: 0,
            read_offset: ids.len(),
            ids,
        }
    }

    /// Adds one id; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(new) = full.get(prefix.len()..) {
                let new = new.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(new);
            }
        }
        Ok(String::new())
    }

    /// Text still held back at the end of the sequence (an incomplete character shows as U+FFFD).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
