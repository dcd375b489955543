//! The simulator's state: the registered devices ("My devices") and their redeemed
//! vouchers, kept as JSON in `STATE_DIR/state.json`, plus the signing key in
//! `STATE_DIR/signing.key`. Pure data and decisions, and the two files.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use comtrexx_licensing_domain::license::{encode_signing_key, parse_signing_key};
use comtrexx_licensing_domain::{
    Edition, Entitlement, Feature, LicensePayload, SeatModel, SerialNumber,
};

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// The signing key's file name inside the state directory.
pub const KEY_FILE: &str = "signing.key";
/// The `format` tag of the state file.
pub const STATE_FORMAT: &str = "licensing-sim-state/v1";

/// A redeemed voucher: purchased licenses of one feature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voucher {
    pub feature: Feature,
    pub quantity: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    pub redeemed_at: DateTime<Utc>,
}

/// A registered PBX with its licenses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub serial_number: SerialNumber,
    pub name: String,
    pub edition: Edition,
    /// In the order they were redeemed.
    #[serde(default)]
    pub licenses: Vec<Voucher>,
    /// When the device first reported starting its tryout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tryout_started_at: Option<DateTime<Utc>>,
    /// The seat model of each feature sold as other than assigned (a voucher
    /// redeemed with a seat model sets its feature's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub seat_models: BTreeMap<Feature, SeatModel>,
    /// The daily peaks of use the device reported with its reconciles, by
    /// (feature, day): a day reported again keeps the larger numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<UsageDay>,
}

/// One day's peak of a concurrent feature, as a device reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageDay {
    pub feature: Feature,
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub peak_in_use: u32,
    pub capacity: u32,
    pub busy: u64,
}

/// How many usage days a device keeps (the oldest go first).
pub const USAGE_DAYS_KEPT: usize = 400;

impl Device {
    /// The entitlements at `now`, one per feature: the quantities of the vouchers
    /// that have not expired, summed, expiring at the earliest expiry among them
    /// (`None` when none of them expires). Features without such vouchers are absent.
    pub fn entitlements(&self, now: DateTime<Utc>) -> Vec<Entitlement> {
        let mut by_feature: BTreeMap<Feature, Entitlement> = BTreeMap::new();
        for v in self
            .licenses
            .iter()
            .filter(|v| v.expires_at.is_none_or(|end| now < end))
        {
            let e = by_feature.entry(v.feature).or_insert(Entitlement {
                seat_model: self
                    .seat_models
                    .get(&v.feature)
                    .copied()
                    .unwrap_or_default(),
                feature: v.feature,
                quantity: 0,
                expires_at: None,
            });
            e.quantity = e.quantity.saturating_add(v.quantity);
            e.expires_at = match (e.expires_at, v.expires_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        by_feature.into_values().collect()
    }

    /// The license document content for this device at `now`.
    pub fn payload(&self, now: DateTime<Utc>, nonce: Option<String>) -> LicensePayload {
        LicensePayload {
            serial_number: self.serial_number.as_str().to_owned(),
            edition: self.edition,
            issued_at: now,
            entitlements: self.entitlements(now),
            nonce,
        }
    }

    /// Records reported usage: per (feature, day) the larger of what was
    /// known and what is reported; at most [`USAGE_DAYS_KEPT`] days per feature.
    pub fn record_usage(&mut self, reported: impl IntoIterator<Item = UsageDay>) {
        for r in reported {
            match self
                .usage
                .iter_mut()
                .find(|u| u.feature == r.feature && u.day == r.day)
            {
                Some(u) => {
                    u.peak_in_use = u.peak_in_use.max(r.peak_in_use);
                    u.capacity = u.capacity.max(r.capacity);
                    u.busy = u.busy.max(r.busy);
                }
                None => self.usage.push(r),
            }
        }
        self.usage
            .sort_by(|a, b| (a.feature, &a.day).cmp(&(b.feature, &b.day)));
        for feature in Feature::ALL {
            let n = self.usage.iter().filter(|u| u.feature == feature).count();
            let mut excess = n.saturating_sub(USAGE_DAYS_KEPT);
            self.usage.retain(|u| {
                if u.feature == feature && excess > 0 {
                    excess -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }

    /// How many licenses of `feature` the device holds (expired vouchers included).
    pub fn held(&self, feature: Feature) -> u64 {
        self.licenses
            .iter()
            .filter(|v| v.feature == feature)
            .map(|v| u64::from(v.quantity))
            .sum()
    }
}

/// Why a state change was refused; each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
}

impl From<SimError> for tonic::Status {
    fn from(e: SimError) -> Self {
        match e {
            SimError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            SimError::NotFound(m) => tonic::Status::not_found(m),
            SimError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
        }
    }
}

/// Every device the simulator knows, by serial number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimState {
    pub format: String,
    pub devices: BTreeMap<String, Device>,
}

impl Default for SimState {
    fn default() -> Self {
        Self {
            format: STATE_FORMAT.to_owned(),
            devices: BTreeMap::new(),
        }
    }
}

impl SimState {
    /// Reads the state file; an absent file is an empty state.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let state: SimState =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        anyhow::ensure!(
            state.format == STATE_FORMAT,
            "{}: unknown format {:?}, expected {STATE_FORMAT:?}",
            path.display(),
            state.format
        );
        for (serial, device) in &state.devices {
            anyhow::ensure!(
                serial == device.serial_number.as_str(),
                "{}: device under {serial:?} has serial {:?}",
                path.display(),
                device.serial_number.as_str()
            );
        }
        Ok(state)
    }

    /// Writes the state file atomically: a temporary file beside it, flushed to
    /// disk, then renamed over the old one. A crash leaves the old or the new file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = tmp_path(path);
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent()
                && let Ok(dir) = std::fs::File::open(dir)
            {
                let _ = dir.sync_all(); // best effort: not every platform syncs directories
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    pub fn device(&self, serial: &SerialNumber) -> Result<&Device, SimError> {
        self.devices
            .get(serial.as_str())
            .ok_or_else(|| not_registered(serial))
    }

    pub fn device_mut(&mut self, serial: &SerialNumber) -> Result<&mut Device, SimError> {
        self.devices
            .get_mut(serial.as_str())
            .ok_or_else(|| not_registered(serial))
    }

    /// Adds a device, or renames / re-editions a registered one (its licenses stay).
    pub fn register(&mut self, serial: SerialNumber, name: String, edition: Edition) -> &Device {
        let device = self
            .devices
            .entry(serial.as_str().to_owned())
            .or_insert_with(|| Device {
                seat_models: BTreeMap::new(),
                usage: Vec::new(),
                serial_number: serial,
                name: String::new(),
                edition,
                licenses: Vec::new(),
                tryout_started_at: None,
            });
        device.name = name;
        device.edition = edition;
        device
    }

    /// Adds a voucher of `quantity` licenses of `feature` (at least one).
    pub fn redeem(
        &mut self,
        serial: &SerialNumber,
        feature: Feature,
        quantity: u32,
        expires_at: Option<DateTime<Utc>>,
        seat_model: Option<SeatModel>,
        now: DateTime<Utc>,
    ) -> Result<&Device, SimError> {
        if quantity == 0 {
            return Err(SimError::InvalidArgument(
                "quantity: must be at least 1".into(),
            ));
        }
        let device = self.device_mut(serial)?;
        match seat_model {
            Some(SeatModel::Concurrent) => {
                device.seat_models.insert(feature, SeatModel::Concurrent);
            }
            Some(SeatModel::Assigned) => {
                device.seat_models.remove(&feature);
            }
            None => {}
        }
        device.licenses.push(Voucher {
            feature,
            quantity,
            expires_at,
            redeemed_at: now,
        });
        Ok(device)
    }

    /// Removes `quantity` licenses of `feature`, the most recently redeemed first
    /// (a voucher reduced to nothing is dropped); `0` removes all of them.
    pub fn revoke(
        &mut self,
        serial: &SerialNumber,
        feature: Feature,
        quantity: u32,
    ) -> Result<&Device, SimError> {
        let device = self.device_mut(serial)?;
        if quantity == 0 {
            device.licenses.retain(|v| v.feature != feature);
            return Ok(device);
        }
        let held = device.held(feature);
        if u64::from(quantity) > held {
            return Err(SimError::FailedPrecondition(format!(
                "cannot revoke {quantity} {feature} licenses: {serial} holds {held}"
            )));
        }
        let mut left = quantity;
        for v in device
            .licenses
            .iter_mut()
            .rev()
            .filter(|v| v.feature == feature)
        {
            let take = left.min(v.quantity);
            v.quantity -= take;
            left -= take;
            if left == 0 {
                break;
            }
        }
        device.licenses.retain(|v| v.quantity > 0);
        Ok(device)
    }

    /// Records the tryout start; the first report wins. Returns whether it changed.
    pub fn report_tryout(
        &mut self,
        serial: &SerialNumber,
        started_at: DateTime<Utc>,
    ) -> Result<bool, SimError> {
        let device = self.device_mut(serial)?;
        if device.tryout_started_at.is_some() {
            return Ok(false);
        }
        device.tryout_started_at = Some(started_at);
        Ok(true)
    }
}

impl SimState {
    /// Starts the tryout unless the serial already started it: answers the start
    /// recorded and whether this call recorded it.
    pub fn start_tryout(
        &mut self,
        serial: &SerialNumber,
        started_at: DateTime<Utc>,
    ) -> Result<(DateTime<Utc>, bool), SimError> {
        let device = self.device_mut(serial)?;
        match device.tryout_started_at {
            Some(earlier) => Ok((earlier, false)),
            None => {
                device.tryout_started_at = Some(started_at);
                Ok((started_at, true))
            }
        }
    }
}

fn not_registered(serial: &SerialNumber) -> SimError {
    SimError::NotFound(format!("serial number {serial} is not registered"))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The simulator's signing key from `dir/signing.key`, created (Ed25519, base64,
/// owner-only) when there is none yet. Creates `dir` too.
pub fn load_or_create_key(dir: &Path) -> anyhow::Result<SigningKey> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_signing_key(&text)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("signing key {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            write_secret(&path, &encode_signing_key(&key))?;
            tracing::info!(path = %path.display(), "created a new development signing key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

fn write_secret(path: &Path, content: &str) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    writeln!(file, "{content}").with_context(|| format!("write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn serial(s: &str) -> SerialNumber {
        SerialNumber::parse(s).unwrap()
    }

    fn state_with_device() -> SimState {
        let mut state = SimState::default();
        state.register(serial("S1"), "office".into(), Edition::Vm);
        state
    }

    #[test]
    fn entitlements_sum_current_vouchers_with_the_earliest_expiry() {
        let mut s = state_with_device();
        let now = t("2026-05-01T00:00:00Z");
        let sn = serial("S1");
        s.redeem(&sn, Feature::User, 10, None, None, now).unwrap();
        s.redeem(
            &sn,
            Feature::User,
            5,
            Some(t("2027-01-01T00:00:00Z")),
            None,
            now,
        )
        .unwrap();
        s.redeem(
            &sn,
            Feature::User,
            2,
            Some(t("2026-12-01T00:00:00Z")),
            None,
            now,
        )
        .unwrap();
        // Expired: does not count.
        s.redeem(
            &sn,
            Feature::User,
            100,
            Some(t("2026-04-01T00:00:00Z")),
            None,
            now,
        )
        .unwrap();
        s.redeem(&sn, Feature::CallAssist, 3, None, None, now)
            .unwrap();
        let e = s.device(&sn).unwrap().entitlements(now);
        assert_eq!(
            e,
            vec![
                Entitlement {
                    seat_model: Default::default(),
                    feature: Feature::CallAssist,
                    quantity: 3,
                    expires_at: None
                },
                Entitlement {
                    seat_model: Default::default(),
                    feature: Feature::User,
                    quantity: 17,
                    expires_at: Some(t("2026-12-01T00:00:00Z"))
                },
            ]
        );
        // Only expired vouchers of a feature: the feature is absent.
        let mut s = state_with_device();
        s.redeem(
            &sn,
            Feature::User,
            1,
            Some(t("2026-01-01T00:00:00Z")),
            None,
            now,
        )
        .unwrap();
        assert!(s.device(&sn).unwrap().entitlements(now).is_empty());
    }

    #[test]
    fn payload_carries_device_and_nonce() {
        let s = state_with_device();
        let now = t("2026-05-01T00:00:00Z");
        let p = s
            .device(&serial("S1"))
            .unwrap()
            .payload(now, Some("abc".into()));
        assert_eq!(
            (
                p.serial_number.as_str(),
                p.edition,
                p.issued_at,
                p.nonce.as_deref()
            ),
            ("S1", Edition::Vm, now, Some("abc"))
        );
    }

    #[test]
    fn reregistering_keeps_licenses() {
        let mut s = state_with_device();
        let sn = serial("S1");
        s.redeem(&sn, Feature::User, 4, None, None, Utc::now())
            .unwrap();
        s.register(sn.clone(), "renamed".into(), Edition::Business);
        let d = s.device(&sn).unwrap();
        assert_eq!(
            (d.name.as_str(), d.edition, d.held(Feature::User)),
            ("renamed", Edition::Business, 4)
        );
    }

    #[test]
    fn redeem_needs_a_device_and_a_quantity() {
        let mut s = state_with_device();
        let now = Utc::now();
        assert!(matches!(
            s.redeem(&serial("NOPE"), Feature::User, 1, None, None, now),
            Err(SimError::NotFound(_))
        ));
        assert!(matches!(
            s.redeem(&serial("S1"), Feature::User, 0, None, None, now),
            Err(SimError::InvalidArgument(_))
        ));
    }

    #[test]
    fn revoke_reduces_latest_vouchers_first() {
        let mut s = state_with_device();
        let sn = serial("S1");
        let now = Utc::now();
        s.redeem(&sn, Feature::User, 10, None, None, now).unwrap();
        s.redeem(&sn, Feature::CallAssist, 2, None, None, now)
            .unwrap();
        s.redeem(&sn, Feature::User, 3, None, None, now).unwrap();
        let d = s.revoke(&sn, Feature::User, 5).unwrap();
        assert_eq!(d.held(Feature::User), 8);
        // The 3-voucher is gone, the 10-voucher became 8.
        let users: Vec<u32> = d
            .licenses
            .iter()
            .filter(|v| v.feature == Feature::User)
            .map(|v| v.quantity)
            .collect();
        assert_eq!(users, vec![8]);
        assert!(matches!(
            s.revoke(&sn, Feature::User, 9),
            Err(SimError::FailedPrecondition(_))
        ));
        let d = s.revoke(&sn, Feature::User, 0).unwrap();
        assert_eq!((d.held(Feature::User), d.held(Feature::CallAssist)), (0, 2));
        // Revoking all of nothing is fine.
        assert!(s.revoke(&sn, Feature::User, 0).is_ok());
        assert!(matches!(
            s.revoke(&serial("NOPE"), Feature::User, 0),
            Err(SimError::NotFound(_))
        ));
    }

    #[test]
    fn first_tryout_report_wins() {
        let mut s = state_with_device();
        let sn = serial("S1");
        assert!(s.report_tryout(&sn, t("2026-01-01T00:00:00Z")).unwrap());
        assert!(!s.report_tryout(&sn, t("2026-02-01T00:00:00Z")).unwrap());
        assert_eq!(
            s.device(&sn).unwrap().tryout_started_at,
            Some(t("2026-01-01T00:00:00Z"))
        );
        assert!(matches!(
            s.report_tryout(&serial("NOPE"), Utc::now()),
            Err(SimError::NotFound(_))
        ));
    }

    #[test]
    fn a_tryout_starts_once() {
        let mut s = state_with_device();
        let sn = serial("S1");
        let first = t("2026-01-01T00:00:00Z");
        assert_eq!(s.start_tryout(&sn, first).unwrap(), (first, true));
        assert_eq!(
            s.start_tryout(&sn, t("2026-03-01T00:00:00Z")).unwrap(),
            (first, false)
        );
        // A report does not move it either.
        assert!(!s.report_tryout(&sn, t("2026-04-01T00:00:00Z")).unwrap());
        assert!(matches!(
            s.start_tryout(&serial("NOPE"), first),
            Err(SimError::NotFound(_))
        ));
    }

    #[test]
    fn state_file_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        assert_eq!(SimState::load(&path).unwrap(), SimState::default());
        let mut s = state_with_device();
        s.redeem(
            &serial("S1"),
            Feature::User,
            3,
            Some(t("2027-01-01T00:00:00Z")),
            None,
            t("2026-01-01T00:00:00Z"),
        )
        .unwrap();
        s.save(&path).unwrap();
        assert!(!tmp_path(&path).exists());
        assert_eq!(SimState::load(&path).unwrap(), s);
        std::fs::write(&path, "{\"format\":\"other\",\"devices\":{}}").unwrap();
        assert!(SimState::load(&path).is_err());
        std::fs::write(&path, "not json").unwrap();
        assert!(SimState::load(&path).is_err());
    }

    #[test]
    fn the_key_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("sim");
        let a = load_or_create_key(&state_dir).unwrap();
        let b = load_or_create_key(&state_dir).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(state_dir.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
