-- The W3C trace context of the request that caused each webhook delivery, so that the delivery
-- attempts join that trace and the receiver gets a `traceparent` of it.
ALTER TABLE webhook_deliveries ADD COLUMN traceparent TEXT;
