//! The policy engine over real SMTP (filled in by the policy tests).
