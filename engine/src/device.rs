//! Where a run's model work happens: `--device cpu | cuda | cuda:<N>`, parsed once at the command
//! line into a [`Device`] and handed to every stage through [`RunCtx::device`](crate::RunCtx::device).
//!
//! The engine only carries the choice; the stages that train or run models turn it into a device
//! of their ML library (and say how to rebuild when CUDA support is not compiled in). The device
//! never enters a cache key: a stage trained on the CPU stays cached for a CUDA run and back.

use std::fmt;
use std::str::FromStr;

/// The device stages run models on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// The NVIDIA GPU with this CUDA ordinal (`cuda` = `cuda:0`).
    Cuda { ordinal: usize },
}

/// The values `--device` accepts, for help texts and errors.
pub const DEVICE_VALUES: &str = "`cpu`, `cuda` (GPU 0) or `cuda:<N>` (GPU N)";

/// A `--device` value that is none of [`DEVICE_VALUES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDeviceError {
    #[error("unknown device `{0}`; expected {DEVICE_VALUES}")]
    Unknown(String),
    #[error("invalid GPU ordinal in `{0}`: expected `cuda:<N>` with N a number, e.g. `cuda:1`")]
    Ordinal(String),
}

impl FromStr for Device {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda { ordinal: 0 }),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => {
                    n.parse().map(|ordinal| Device::Cuda { ordinal }).map_err(|_| ParseDeviceError::Ordinal(s.into()))
                }
                None => Err(ParseDeviceError::Unknown(s.into())),
            },
        }
    }
}

/// The spelling `--device` accepts (`cuda` for GPU 0), so that `parse(to_string())` round-trips.
impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda { ordinal: 0 } => f.write_str("cuda"),
            Device::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl Device {
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        for (s, d) in
            [("cpu", Device::Cpu), ("cuda", Device::Cuda { ordinal: 0 }), ("cuda:3", Device::Cuda { ordinal: 3 })]
        {
            assert_eq!(s.parse::<Device>(), Ok(d));
            assert_eq!(d.to_string(), s);
        }
        assert_eq!("cuda:0".parse::<Device>(), Ok(Device::Cuda { ordinal: 0 }));
    }

    #[test]
    fn errors_list_the_accepted_values() {
        let e = "tpu".parse::<Device>().unwrap_err().to_string();
        assert_eq!(e, "unknown device `tpu`; expected `cpu`, `cuda` (GPU 0) or `cuda:<N>` (GPU N)");
        let e = "cuda:x".parse::<Device>().unwrap_err().to_string();
        assert!(e.contains("invalid GPU ordinal in `cuda:x`"), "{e}");
        assert!("CPU".parse::<Device>().is_err(), "spellings are exact");
    }
}
