"""Checks rendered manifests of helm/issuer (scripts/chart.sh): what a cluster operator relies on.

Fails with a message naming the manifest and the missing property.
"""
import sys

import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
failures = []


def need(cond, what):
    if not cond:
        failures.append(what)


for kind in ["Deployment", "Service", "ConfigMap", "ServiceAccount", "Job",
             "HorizontalPodAutoscaler", "PodDisruptionBudget", "PodMonitor", "NetworkPolicy"]:
    need(kind in by_kind, f"no {kind} rendered")


def check_container(owner, pod, c):
    sc = c.get("securityContext", {})
    need(sc.get("runAsNonRoot") is True, f"{owner}/{c['name']}: runAsNonRoot")
    need(sc.get("readOnlyRootFilesystem") is True, f"{owner}/{c['name']}: readOnlyRootFilesystem")
    need(sc.get("allowPrivilegeEscalation") is False, f"{owner}/{c['name']}: allowPrivilegeEscalation false")
    need(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{owner}/{c['name']}: drop ALL capabilities")
    res = c.get("resources", {})
    need(res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory"),
         f"{owner}/{c['name']}: cpu and memory requests")
    need(res.get("limits", {}).get("memory"), f"{owner}/{c['name']}: a memory limit")
    need(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{owner}: pod runAsNonRoot")
    names = {e["name"] for e in c.get("env", [])}
    for env in ["ISSUER_DATABASE_URL", "ISSUER_SECRET_KEY", "ISSUER_TOKEN_SIGNING_KEY",
                "ISSUER_CREDENTIAL_SIGNING_KEY", "ISSUER_PUBLIC_URL"]:
        need(env in names, f"{owner}/{c['name']}: env {env}")
    for e in c.get("env", []):
        if e["name"] in ("ISSUER_DATABASE_URL", "ISSUER_SECRET_KEY", "ISSUER_REDIS_URL",
                         "ISSUER_SMTP_URL") or e["name"].endswith("SIGNING_KEY"):
            need("secretKeyRef" in e.get("valueFrom", {}), f"{owner}: {e['name']} from a Secret")


for dep in by_kind.get("Deployment", []):
    pod = dep["spec"]["template"]["spec"]
    for c in pod["containers"]:
        check_container("Deployment", pod, c)
        for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                            ("startupProbe", "/healthz")]:
            need(c.get(probe, {}).get("httpGet", {}).get("path") == path, f"Deployment: {probe} on {path}")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        need(env.get("ISSUER_MIGRATE_ON_START") == "false", "Deployment: migrations left to the hook")
        need(env.get("ISSUER_METRICS_ADDR") == "0.0.0.0:9464", "Deployment: metrics on their own port")
        need("metrics" in {p.get("name") for p in c.get("ports", [])}, "Deployment: a metrics port")
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    need(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9464",
         "Deployment: pods annotated for scraping")
    need(pod.get("terminationGracePeriodSeconds", 0) >= 30, "Deployment: a grace period for draining")
    need(dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, "Deployment: no capacity lost on rollout")

for job in by_kind.get("Job", []):
    ann = job["metadata"].get("annotations", {})
    need(set(ann.get("helm.sh/hook", "").split(",")) == {"pre-install", "pre-upgrade"},
         "migration Job: pre-install,pre-upgrade hook")
    pod = job["spec"]["template"]["spec"]
    for c in pod["containers"]:
        need(c.get("args") == ["migrate"], "migration Job runs `issuer migrate`")
        check_container("Job", pod, c)

if failures:
    print("chart check failed:\n  " + "\n  ".join(failures))
    sys.exit(1)
print(f"chart check passed: {len(docs)} manifests")
