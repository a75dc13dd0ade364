//! Seeded shuffling of a row stream larger than memory.
//!
//! [`ShuffleBuffer`] holds rows in memory up to a byte budget; past it, rows go to a temporary
//! Parquet file in a scratch directory. [`ShuffleBuffer::finish_into`] writes the rows in the order
//! of one seeded Fisher–Yates permutation (`SliceRandom::shuffle` of the row indices with the
//! given RNG), so the output is the same whether or not the buffer spilled: in memory it is exactly
//! `rows.shuffle(rng)`; spilled, the rows are distributed into buckets of consecutive output
//! positions (one sequential pass), and each bucket, small enough for memory, is ordered and
//! written in turn. Peak memory is about one bucket plus one batch per bucket writer.

use std::path::{Path, PathBuf};

use pipeline_engine::StageError;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::{DatasetReader, DatasetWriter, Sample};

/// Default budget of rows held in memory before spilling (approximate text bytes).
pub const SPILL_BYTES: usize = 256 << 20;

/// Approximate in-memory size of a row (its texts plus fixed overhead).
pub fn approx_bytes(s: &Sample) -> usize {
    s.texts().map(str::len).sum::<usize>() + s.id.len() + s.source.len() + 96
}

pub struct ShuffleBuffer {
    dir: PathBuf,
    budget: usize,
    rows: Vec<Sample>,
    bytes: usize,
    spill: Option<DatasetWriter>,
    spilled: usize,
    spilled_bytes: usize,
}

impl ShuffleBuffer {
    /// `dir`: where spill files go (created on first spill, removed by `finish_into`).
    pub fn new(dir: &Path, budget: usize) -> Self {
        ShuffleBuffer {
            dir: dir.to_path_buf(),
            budget: budget.max(1),
            rows: Vec::new(),
            bytes: 0,
            spill: None,
            spilled: 0,
            spilled_bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.spilled + self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether rows have gone to disk.
    pub fn spilled(&self) -> bool {
        self.spill.is_some()
    }

    pub fn push(&mut self, s: Sample) -> Result<(), StageError> {
        self.bytes += approx_bytes(&s);
        self.rows.push(s);
        if self.bytes > self.budget {
            self.spill_rows()?;
        }
        Ok(())
    }

    pub fn extend(&mut self, rows: impl IntoIterator<Item = Sample>) -> Result<(), StageError> {
        for s in rows {
            self.push(s)?;
        }
        Ok(())
    }

    fn spill_rows(&mut self) -> Result<(), StageError> {
        if self.spill.is_none() {
            self.spill = Some(DatasetWriter::create(&self.dir.join("spill"))?);
        }
        let w = self.spill.as_mut().expect("created above");
        self.spilled += self.rows.len();
        self.spilled_bytes += self.bytes;
        w.extend(self.rows.drain(..))?;
        self.bytes = 0;
        Ok(())
    }

    /// Write every row to `out` in seeded-shuffled order (`shuffle = false`: arrival order).
    pub fn finish_into(
        mut self,
        out: &mut DatasetWriter,
        shuffle: bool,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), StageError> {
        if self.spill.is_none() {
            if shuffle {
                self.rows.shuffle(rng);
            }
            return out.extend(self.rows);
        }
        self.spill_rows()?;
        let spill = self.spill.take().expect("spilled");
        spill.finish()?;
        let spill_dir = self.dir.join("spill");
        let result = self.write_spilled(&spill_dir, out, shuffle, rng);
        let _ = std::fs::remove_dir_all(&self.dir);
        result
    }

    fn write_spilled(
        &self,
        spill_dir: &Path,
        out: &mut DatasetWriter,
        shuffle: bool,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), StageError> {
        let n = self.spilled;
        if !shuffle {
            for batch in DatasetReader::open(spill_dir)? {
                out.extend(batch?)?;
            }
            return Ok(());
        }
        // order[k] = the input index written k-th (exactly what `rows.shuffle(rng)` would give).
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(rng);
        let mut pos = vec![0usize; n];
        for (k, &i) in order.iter().enumerate() {
            pos[i] = k;
        }
        drop(order);
        let buckets = self.spilled_bytes.div_ceil(self.budget).max(1);
        let per = n.div_ceil(buckets).max(1);
        let bucket_dir = |b: usize| self.dir.join(format!("bucket-{b}"));
        let mut writers = (0..buckets).map(|b| DatasetWriter::create(&bucket_dir(b))).collect::<Result<Vec<_>, _>>()?;
        let mut i = 0usize;
        for batch in DatasetReader::open(spill_dir)? {
            for s in batch? {
                writers[pos[i] / per].push(s)?;
                i += 1;
            }
        }
        for w in writers {
            w.finish()?;
        }
        std::fs::remove_dir_all(spill_dir).map_err(|e| StageError::io(spill_dir, e))?;
        // Bucket b holds output positions [b·per, (b+1)·per), in input order.
        let mut mine: Vec<usize> = Vec::new();
        for b in 0..buckets {
            mine.clear();
            mine.extend((0..n).filter(|&i| pos[i] / per == b).map(|i| pos[i]));
            let mut rows: Vec<(usize, Sample)> = Vec::with_capacity(mine.len());
            let mut it = mine.iter();
            for batch in DatasetReader::open(&bucket_dir(b))? {
                for s in batch? {
                    let p =
                        *it.next().ok_or_else(|| StageError::failed("shuffle bucket holds more rows than expected"))?;
                    rows.push((p, s));
                }
            }
            rows.sort_unstable_by_key(|(p, _)| *p);
            out.extend(rows.into_iter().map(|(_, s)| s))?;
            let d = bucket_dir(b);
            std::fs::remove_dir_all(&d).map_err(|e| StageError::io(&d, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{read_dataset, Message};
    use rand::SeedableRng;

    fn rows(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                id: format!("r:{i}"),
                source: "t".into(),
                messages: vec![Message::new("user", format!("question {i} {}", "x".repeat(i % 17)))],
                ..Default::default()
            })
            .collect()
    }

    fn run(budget: usize, n: usize, shuffle: bool) -> (Vec<Sample>, bool) {
        let tmp = tempfile::tempdir().unwrap();
        let mut buf = ShuffleBuffer::new(&tmp.path().join("scratch"), budget);
        buf.extend(rows(n)).unwrap();
        let spilled = buf.spilled();
        let mut w = DatasetWriter::create(&tmp.path().join("out")).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        buf.finish_into(&mut w, shuffle, &mut rng).unwrap();
        w.finish().unwrap();
        assert!(!tmp.path().join("scratch").exists(), "spill files are removed");
        (read_dataset(&tmp.path().join("out")).unwrap(), spilled)
    }

    #[test]
    fn spilled_shuffle_equals_in_memory_shuffle() {
        for n in [0, 1, 5, 999, 5000] {
            let (mem, s1) = run(usize::MAX, n, true);
            let (disk, s2) = run(2000, n, true);
            assert!(!s1);
            assert_eq!(s2, n >= 999, "n = {n}");
            assert_eq!(mem, disk, "n = {n}");
            let mut expect = rows(n);
            expect.shuffle(&mut ChaCha8Rng::seed_from_u64(7));
            assert_eq!(mem, expect);
            let (plain, _) = run(2000, n, false);
            assert_eq!(plain, rows(n));
        }
    }
}
