//! The driver a device needs: the fatbin's SASS and PTX come from the CUDA release build.rs ran
//! (nvcc's, `cuda::fatbin::BUILT_WITH`), and a driver loads them only if it supports that
//! release. Checked when a device is opened, so an old driver is named as such instead of failing
//! the first module load with `CUDA_ERROR_UNSUPPORTED_PTX_VERSION` or a missing kernel image.

use crate::{Error, Result};

/// A CUDA release, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion {
    pub major: u32,
    pub minor: u32,
}

impl CudaVersion {
    /// The release `cuDriverGetVersion` encodes as `1000 · major + 10 · minor` (13000 for 13.0).
    pub fn from_driver(encoded: i32) -> Self {
        let v = encoded.max(0) as u32;
        CudaVersion {
            major: v / 1000,
            minor: (v % 1000) / 10,
        }
    }
}

impl std::fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The oldest Linux driver branch that supports `built`, where we know it (CUDA's release notes,
/// "CUDA Toolkit and Corresponding Driver Versions").
fn linux_driver_for(built: CudaVersion) -> Option<&'static str> {
    match (built.major, built.minor) {
        (13, 0) => Some("580.65.06"),
        (12, 8) => Some("570.26"),
        _ => None,
    }
}

/// Ok when a driver reporting `driver` (`cuDriverGetVersion`) supports the CUDA release `built`
/// the kernels were compiled with; otherwise [`Error::CudaDriverTooOld`] naming both and what to
/// do.
pub fn check_driver_version(driver: i32, built: CudaVersion) -> Result<()> {
    let supported = CudaVersion::from_driver(driver);
    if supported >= built {
        return Ok(());
    }
    let advice = match linux_driver_for(built) {
        Some(min) => format!(
            "install an NVIDIA driver for CUDA {built} or newer (Linux {min} or newer), or \
             rebuild with a CUDA toolkit no newer than {supported}"
        ),
        None => format!(
            "install an NVIDIA driver for CUDA {built} or newer, or rebuild with a CUDA toolkit \
             no newer than {supported}"
        ),
    };
    Err(Error::CudaDriverTooOld {
        driver: supported.to_string(),
        built: built.to_string(),
        advice,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V13_0: CudaVersion = CudaVersion {
        major: 13,
        minor: 0,
    };

    #[test]
    fn driver_versions_decode_as_cuda_does() {
        assert_eq!(CudaVersion::from_driver(13000), V13_0);
        assert_eq!(
            CudaVersion::from_driver(12080),
            CudaVersion {
                major: 12,
                minor: 8
            }
        );
        assert_eq!(CudaVersion::from_driver(12080).to_string(), "12.8");
    }

    #[test]
    fn a_driver_for_the_build_release_or_newer_is_accepted() {
        for driver in [13000, 13010, 13020, 14000] {
            check_driver_version(driver, V13_0).unwrap();
        }
    }

    #[test]
    fn an_older_driver_is_refused_naming_both_versions_and_the_fix() {
        for (driver, shown) in [
            (12080, "12.8"),
            (12090, "12.9"),
            (11080, "11.8"),
            (0, "0.0"),
        ] {
            let err = check_driver_version(driver, V13_0).unwrap_err();
            assert!(matches!(err, Error::CudaDriverTooOld { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("CUDA {shown}")), "{msg}");
            assert!(msg.contains("CUDA 13.0"), "{msg}");
            assert!(msg.contains("580.65.06"), "{msg}");
            assert!(msg.contains("install an NVIDIA driver"), "{msg}");
        }
        let minor = CudaVersion {
            major: 13,
            minor: 1,
        };
        let msg = check_driver_version(13000, minor).unwrap_err().to_string();
        assert!(
            msg.contains("CUDA 13.0") && msg.contains("CUDA 13.1"),
            "{msg}"
        );
    }
}
