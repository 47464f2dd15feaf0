//! The closed sets of the API as proto enums (`_UNSPECIFIED` zero, AIP-216), mapped from and to
//! the domain's types. The deprecated string fields beside them carry the REST words.

use issuer_domain::{
    Error, FieldViolation,
    model::{Delivery, EmailState, EventKind, IssuanceStatus},
    status::CredentialStatus,
};

use super::pb::{self, email_delivery, issuance};

pub fn state(s: IssuanceStatus) -> issuance::State {
    match s {
        IssuanceStatus::Pending => issuance::State::Pending,
        IssuanceStatus::Accepted => issuance::State::Accepted,
        IssuanceStatus::Rejected => issuance::State::Rejected,
        IssuanceStatus::Error => issuance::State::Error,
    }
}

pub fn delivery(d: Delivery) -> pb::DeliveryMethod {
    match d {
        Delivery::None => pb::DeliveryMethod::None,
        Delivery::Email => pb::DeliveryMethod::Email,
        Delivery::Link => pb::DeliveryMethod::Link,
        Delivery::Qr => pb::DeliveryMethod::Qr,
    }
}

pub fn event_type(k: EventKind) -> pb::EventType {
    match k {
        EventKind::Created => pb::EventType::Created,
        EventKind::OfferRetrieved => pb::EventType::OfferRetrieved,
        EventKind::Cancelled => pb::EventType::Cancelled,
        EventKind::Expired => pb::EventType::Expired,
        EventKind::TokenIssued => pb::EventType::TokenIssued,
        EventKind::CredentialIssued => pb::EventType::CredentialIssued,
        EventKind::CredentialAccepted => pb::EventType::CredentialAccepted,
        EventKind::CredentialDeleted => pb::EventType::CredentialDeleted,
        EventKind::CredentialFailure => pb::EventType::CredentialFailure,
        EventKind::EmailSent => pb::EventType::EmailSent,
        EventKind::EmailFailed => pb::EventType::EmailFailed,
        EventKind::CredentialRevoked => pb::EventType::CredentialRevoked,
        EventKind::CredentialSuspended => pb::EventType::CredentialSuspended,
        EventKind::CredentialReinstated => pb::EventType::CredentialReinstated,
    }
}

pub fn credential_status(s: CredentialStatus) -> issuance::CredentialStatus {
    match s {
        CredentialStatus::Valid => issuance::CredentialStatus::Valid,
        CredentialStatus::Suspended => issuance::CredentialStatus::Suspended,
        CredentialStatus::Revoked => issuance::CredentialStatus::Revoked,
    }
}

pub fn email_state(s: EmailState) -> email_delivery::State {
    match s {
        EmailState::Pending => email_delivery::State::Pending,
        EmailState::Sent => email_delivery::State::Sent,
        EmailState::Failed => email_delivery::State::Failed,
        EmailState::Cancelled => email_delivery::State::Cancelled,
    }
}

/// The word a request means by an enum field and the deprecated string field beside it: the
/// enum's word when set, else the string (empty when neither is set). `words` maps the enum's
/// values to the domain's words; setting both to different values is refused.
pub fn merged_word(
    field: &str,
    value: i32,
    legacy_field: &str,
    legacy: String,
    words: impl Fn(i32) -> Option<&'static str>,
) -> Result<String, Error> {
    if value == 0 {
        return Ok(legacy);
    }
    let Some(word) = words(value) else {
        return Err(Error::invalid(vec![FieldViolation::new(
            field,
            format!("unknown value {value}"),
        )]));
    };
    if !legacy.is_empty() && legacy != word {
        return Err(Error::invalid(vec![FieldViolation::new(
            field,
            format!("`{legacy_field}` says `{legacy}`; set one of the two"),
        )]));
    }
    Ok(word.to_owned())
}

/// The domain's word of a `DeliveryMethod` value.
pub fn delivery_word(value: i32) -> Option<&'static str> {
    let method = pb::DeliveryMethod::try_from(value).ok()?;
    Delivery::ALL
        .into_iter()
        .find(|d| delivery(*d) == method)
        .map(Delivery::as_str)
}

/// The domain's word of an `Issuance.State` value.
pub fn state_word(value: i32) -> Option<&'static str> {
    let wanted = issuance::State::try_from(value).ok()?;
    IssuanceStatus::ALL
        .into_iter()
        .find(|s| state(*s) == wanted)
        .map(IssuanceStatus::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_maps_to_a_distinct_enum_value_and_back() {
        for d in Delivery::ALL {
            assert_eq!(delivery_word(delivery(d) as i32), Some(d.as_str()));
        }
        for s in IssuanceStatus::ALL {
            assert_eq!(state_word(state(s) as i32), Some(s.as_str()));
        }
        let kinds: std::collections::HashSet<_> =
            EventKind::ALL.into_iter().map(event_type).collect();
        assert_eq!(kinds.len(), EventKind::ALL.len());
        assert!(!kinds.contains(&pb::EventType::Unspecified));
        for k in EventKind::ALL {
            assert_eq!(
                event_type(k).as_str_name(),
                format!("EVENT_TYPE_{}", k.as_str().to_ascii_uppercase())
            );
        }
        assert_eq!(delivery_word(0), None);
        assert_eq!(state_word(99), None);
    }

    #[test]
    fn an_enum_and_its_deprecated_word_must_agree() {
        let qr = pb::DeliveryMethod::Qr as i32;
        let merge = |value, legacy: &str| {
            merged_word(
                "delivery_method",
                value,
                "delivery",
                legacy.into(),
                delivery_word,
            )
        };
        assert_eq!(merge(0, "").unwrap(), "");
        assert_eq!(merge(0, "link").unwrap(), "link");
        assert_eq!(merge(qr, "").unwrap(), "qr");
        assert_eq!(merge(qr, "qr").unwrap(), "qr");
        let e = merge(qr, "email").unwrap_err();
        assert_eq!(e.violations[0].field, "delivery_method");
        assert_eq!(
            merge(42, "").unwrap_err().violations[0].field,
            "delivery_method"
        );
    }
}
