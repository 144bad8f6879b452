//! Devices chosen at run time: `--device cpu|ndarray|wgpu|vulkan|metal|cuda[:N]|remote:ws://HOST:PORT`.
//!
//! One binary carries every backend its cargo features compiled in; the model code is the
//! same on all of them (Burn's dispatch backend). A device whose feature is missing, or that
//! cannot be opened (no GPU driver, no server), is a [`DeviceError`] rather than a panic deep
//! inside the first tensor operation.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{Device, Tensor};

/// A device as written on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Burn's Flex CPU backend (always compiled in).
    Cpu,
    /// Burn's NdArray CPU backend (feature `ndarray`).
    Ndarray,
    /// The best wgpu adapter on any graphics API (feature `wgpu`).
    Wgpu,
    /// wgpu pinned to Vulkan (feature `vulkan`).
    Vulkan,
    /// wgpu pinned to Metal (feature `metal`).
    Metal,
    /// CUDA device `index` (feature `cuda`).
    Cuda(usize),
    /// A device served by `vipllava serve-device` at this WebSocket URL (feature `remote`).
    Remote(String),
}

/// Why a device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The spec is not one of the known forms.
    #[error(
        "unknown device `{0}`: expected cpu, ndarray, wgpu, vulkan, metal, cuda[:N] or remote:ws://HOST:PORT"
    )]
    Unknown(String),
    /// The backend was not compiled into this binary.
    #[error(
        "device `{device}` needs the `{feature}` cargo feature, which this binary was built without (rebuild with `--features {feature}`)"
    )]
    NotCompiled {
        /// The device asked for.
        device: String,
        /// The cargo feature that provides it.
        feature: &'static str,
    },
    /// The backend is compiled in but the device does not work here.
    #[error("device `{device}` cannot be opened: {reason}")]
    Unavailable {
        /// The device asked for.
        device: String,
        /// What went wrong, with a hint.
        reason: String,
    },
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Ndarray => f.write_str("ndarray"),
            Self::Wgpu => f.write_str("wgpu"),
            Self::Vulkan => f.write_str("vulkan"),
            Self::Metal => f.write_str("metal"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Remote(url) => write!(f, "remote:{url}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        Ok(match lower.as_str() {
            "cpu" | "flex" => Self::Cpu,
            "ndarray" => Self::Ndarray,
            "wgpu" => Self::Wgpu,
            "vulkan" => Self::Vulkan,
            "metal" => Self::Metal,
            "cuda" => Self::Cuda(0),
            _ => {
                if let Some(index) = lower.strip_prefix("cuda:") {
                    let index = index.parse().map_err(|_| DeviceError::Unknown(s.to_string()))?;
                    Self::Cuda(index)
                } else if let Some(url) = s.trim().strip_prefix("remote:") {
                    if !(url.starts_with("ws://") || url.starts_with("wss://")) || url.len() <= 5 {
                        return Err(DeviceError::Unknown(s.to_string()));
                    }
                    Self::Remote(url.to_string())
                } else {
                    return Err(DeviceError::Unknown(s.to_string()));
                }
            }
        })
    }
}

impl DeviceSpec {
    /// The cargo feature that compiles this device in (`None` for the CPU device).
    pub fn feature(&self) -> Option<&'static str> {
        match self {
            Self::Cpu => None,
            Self::Ndarray => Some("ndarray"),
            Self::Wgpu => Some("wgpu"),
            Self::Vulkan => Some("vulkan"),
            Self::Metal => Some("metal"),
            Self::Cuda(_) => Some("cuda"),
            Self::Remote(_) => Some("remote"),
        }
    }

    /// Whether this binary was built with the device's backend.
    pub fn is_compiled(&self) -> bool {
        match self {
            Self::Cpu => true,
            Self::Ndarray => cfg!(feature = "ndarray"),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Vulkan => cfg!(feature = "vulkan"),
            Self::Metal => cfg!(feature = "metal"),
            Self::Cuda(_) => cfg!(feature = "cuda"),
            Self::Remote(_) => cfg!(feature = "remote"),
        }
    }

    /// Opens the device and checks that it computes: a small tensor is written, added to
    /// and read back. Backends report a missing driver or an unreachable server by
    /// panicking on first use; that is turned into [`DeviceError::Unavailable`] here.
    pub fn open(&self) -> Result<Device, DeviceError> {
        let device = self.construct()?;
        probe(&device).map_err(|reason| DeviceError::Unavailable {
            device: self.to_string(),
            reason: format!("{reason}{}", self.hint()),
        })?;
        Ok(device)
    }

    fn hint(&self) -> &'static str {
        match self {
            Self::Wgpu | Self::Vulkan => {
                " (is a Vulkan driver installed? On Debian/Ubuntu: mesa-vulkan-drivers and libvulkan1)"
            }
            Self::Metal => " (Metal needs macOS with a Metal-capable GPU)",
            Self::Cuda(_) => " (is an NVIDIA driver with this GPU index present?)",
            Self::Remote(_) => " (is `vipllava serve-device` running at that address?)",
            Self::Cpu | Self::Ndarray => "",
        }
    }

    fn construct(&self) -> Result<Device, DeviceError> {
        let not_compiled = || DeviceError::NotCompiled {
            device: self.to_string(),
            feature: self.feature().unwrap_or("flex"),
        };
        match self {
            Self::Cpu => Ok(Device::flex()),
            // Burn 0.22 deprecates NdArray in favour of Flex; it stays selectable for
            // backend comparisons (issue 5) while Burn ships it.
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            Self::Ndarray => Ok(Device::ndarray()),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "vulkan")]
            Self::Vulkan => Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "metal")]
            Self::Metal => Ok(Device::metal(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "cuda")]
            Self::Cuda(index) => Ok(Device::cuda(*index)),
            #[cfg(feature = "remote")]
            Self::Remote(url) => {
                let host = burn::remote::RemoteHost::websocket(url);
                Device::remote_options(&host)
                    .init()
                    .map_err(|e| DeviceError::Unavailable {
                        device: self.to_string(),
                        reason: format!("{e}{}", self.hint()),
                    })
            }
            #[allow(unreachable_patterns)]
            _ => Err(not_compiled()),
        }
    }
}

/// Parses and opens a `--device` value.
pub fn open_device(spec: &str) -> Result<Device, DeviceError> {
    spec.parse::<DeviceSpec>()?.open()
}

/// Runs one tiny computation on `device`, turning a backend panic into its message.
fn probe(device: &Device) -> Result<(), String> {
    let device = device.clone();
    let previous = std::panic::take_hook();
    // The backend's own panic message is returned as the error; don't also print it.
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(move || {
        let t = Tensor::<1>::from_floats([1.0, 2.0], &device);
        (t + 1.0).into_data().try_to_vec::<f32>()
    });
    std::panic::set_hook(previous);
    match outcome {
        Ok(Ok(values)) if values == [2.0, 3.0] => Ok(()),
        Ok(Ok(values)) => Err(format!("a test addition returned {values:?} instead of [2, 3]")),
        Ok(Err(e)) => Err(format!("reading a test tensor back failed: {e:?}")),
        Err(payload) => Err(payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the backend panicked while running a test operation".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let cases = [
            ("cpu", DeviceSpec::Cpu),
            ("CPU", DeviceSpec::Cpu),
            ("flex", DeviceSpec::Cpu),
            ("ndarray", DeviceSpec::Ndarray),
            ("wgpu", DeviceSpec::Wgpu),
            ("vulkan", DeviceSpec::Vulkan),
            ("metal", DeviceSpec::Metal),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            (
                "remote:ws://127.0.0.1:3000",
                DeviceSpec::Remote("ws://127.0.0.1:3000".into()),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), want, "{text}");
        }
        for bad in [
            "gpu",
            "cuda:x",
            "cuda:-1",
            "remote:",
            "remote:http://h:1",
            "remote:ws://",
            "",
        ] {
            assert!(
                matches!(bad.parse::<DeviceSpec>(), Err(DeviceError::Unknown(_))),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn cpu_opens_and_missing_features_are_named() {
        assert!(DeviceSpec::Cpu.open().is_ok());
        for spec in [
            DeviceSpec::Ndarray,
            DeviceSpec::Wgpu,
            DeviceSpec::Vulkan,
            DeviceSpec::Metal,
            DeviceSpec::Cuda(0),
            DeviceSpec::Remote("ws://127.0.0.1:1".into()),
        ] {
            if spec.is_compiled() {
                continue;
            }
            let err = spec.open().unwrap_err();
            let feature = spec.feature().unwrap();
            assert!(
                matches!(&err, DeviceError::NotCompiled { feature: f, .. } if *f == feature),
                "{spec}: {err}"
            );
            assert!(
                err.to_string().contains(&format!("--features {feature}")),
                "{err}"
            );
        }
    }
}
