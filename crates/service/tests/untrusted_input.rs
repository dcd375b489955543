//! Property tests of every parser that sees untrusted bytes: activation
//! responses and license documents, initialization codes, page tokens, the
//! callers file and bearer tokens. None may panic, and none may accept
//! anything that does not verify.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{TimeZone as _, Utc};
use comtrexx_licensing::audit::decode_page_token as decode_audit_token;
use comtrexx_licensing::auth::callers::{Callers, bearer, token_sha256};
use comtrexx_licensing::domain::initcode::InitializationCode;
use comtrexx_licensing::domain::{
    Edition, Entitlement, Feature, LicensePayload, SerialNumber, SignedLicense,
};
use comtrexx_licensing::service::{decode_token as decode_seat_token, parse_activation_response};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

fn serial() -> SerialNumber {
    SerialNumber::parse("PBX-1234567").unwrap()
}

fn vendor() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn payload(users: u32) -> LicensePayload {
    LicensePayload {
        serial_number: serial().as_str().to_owned(),
        edition: Edition::Business,
        issued_at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        entitlements: vec![Entitlement {
            seat_model: Default::default(),
            feature: Feature::User,
            quantity: users,
            expires_at: None,
        }],
        nonce: Some("00ff".into()),
    }
}

/// Byte strings biased towards the shapes the parsers expect.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| B64.encode(b)),
        any::<String>().prop_map(|s| format!("{{\"format\":{s:?}}}")),
        any::<String>().prop_map(|s| format!("CTX1-{s}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn activation_responses_never_panic_nor_verify_when_unsigned(raw in text()) {
        if let Ok(signed) = parse_activation_response(&raw) {
            let verified = signed.verify(&vendor().verifying_key(), &serial(), Edition::Business);
            prop_assert!(verified.is_err(), "random input verified: {raw:?}");
        }
        let _ = SignedLicense::from_json(&raw);
    }

    #[test]
    fn a_tampered_license_never_verifies_as_something_else(
        users in 1u32..10_000,
        at in any::<prop::sample::Index>(),
        with in any::<char>(),
        as_base64 in any::<bool>(),
    ) {
        let original = payload(users);
        let json = SignedLicense::sign(&original, &vendor()).to_json();
        let mut chars: Vec<char> = json.chars().collect();
        let i = at.index(chars.len());
        chars[i] = with;
        let tampered: String = chars.into_iter().collect();
        let input = if as_base64 { B64.encode(tampered.as_bytes()) } else { tampered };
        if let Ok(signed) = parse_activation_response(&input)
            && let Ok(verified) = signed.verify(&vendor().verifying_key(), &serial(), Edition::Business)
        {
            // Only a change that leaves the signed payload intact may verify.
            prop_assert_eq!(verified, original);
        }
    }

    #[test]
    fn initialization_codes_never_panic(raw in text()) {
        let _ = InitializationCode::decode(&raw);
    }

    #[test]
    fn a_mistyped_initialization_code_is_refused_or_the_same(
        at in any::<prop::sample::Index>(),
        with in any::<char>(),
    ) {
        let code = InitializationCode::new(serial(), Edition::Advanced);
        let text = code.encode();
        let mut chars: Vec<char> = text.chars().collect();
        let i = at.index(chars.len());
        chars[i] = with;
        let typed: String = chars.into_iter().collect();
        if let Ok(decoded) = InitializationCode::decode(&typed) {
            prop_assert_eq!(decoded, code);
        }
    }

    #[test]
    fn page_tokens_never_panic(raw in text(), user in any::<String>()) {
        let _ = decode_seat_token(&raw, None);
        let _ = decode_seat_token(&raw, Some(Feature::User));
        let _ = decode_audit_token(&raw, &user);
    }

    #[test]
    fn callers_files_never_panic(raw in text()) {
        let _ = Callers::parse(&raw);
    }

    #[test]
    fn callers_file_entries_round_trip(
        name in "[a-z][a-z0-9-]{0,20}",
        role in prop::sample::select(vec!["call_handling", "user_management", "monitoring", "operator"]),
        token in "[!-~]{1,64}",
    ) {
        let file = format!(
            "[[caller]]\nname = {name:?}\nrole = {role:?}\ntoken_sha256 = {:?}\n",
            token_sha256(&token)
        );
        let callers = Callers::parse(&file).unwrap();
        let caller = callers.by_token(&token).unwrap();
        prop_assert_eq!(&caller.name, &name);
        prop_assert_eq!(caller.role.as_str(), role);
    }

    #[test]
    fn bearer_tokens_never_panic_nor_match_another(
        header in proptest::collection::vec(any::<u8>(), 0..700),
        known in "[!-~]{1,64}",
    ) {
        let file = format!(
            "[[caller]]\nname = \"k\"\nrole = \"operator\"\ntoken_sha256 = {:?}\n",
            token_sha256(&known)
        );
        let callers = Callers::parse(&file).unwrap();
        if let Ok(token) = bearer(&header) {
            prop_assert!(token.len() <= 512);
            if token != known {
                prop_assert!(callers.by_token(token).is_none());
            }
        }
    }
}

proptest! {
    // Each case signs with a fresh key, slow in debug builds: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn another_key_never_verifies(users in 1u32..10_000, seed in any::<[u8; 32]>()) {
        prop_assume!(seed != [7; 32]);
        let signed = SignedLicense::sign(&payload(users), &SigningKey::from_bytes(&seed));
        let verified = signed.verify(&vendor().verifying_key(), &serial(), Edition::Business);
        prop_assert!(verified.is_err());
    }

}
