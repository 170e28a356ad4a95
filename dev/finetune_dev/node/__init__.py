"""The process node: a Kubernetes Node whose pods run as local processes.

Started by ``finetune-dev up`` as ``python -m finetune_dev.node``. It plays the kubelet's part for
one Node: registers it (Ready, allocatable cpu/memory/pods, a kubelet endpoint), watches the pods
the scheduler binds to it, and runs each container's command as a process in the project's
environment (the image is ignored) inside private mount and UTS namespaces, so that

- env is resolved like the kubelet does (values, fieldRef, secretKeyRef, configMapKeyRef,
  resourceFieldRef, envFrom, ``$(VAR)`` expansion, KUBERNETES_SERVICE_HOST/PORT);
- configMap, secret, emptyDir, hostPath, downwardAPI and projected (ServiceAccount token)
  volumes appear at their mount paths, and the termination message file at its path;
- each pod has its own IP on 127.0.0.0/8 and hostname, and ``<hostname>.<subdomain>`` of pods
  behind a Service named like the subdomain resolves through the pod's /etc/hosts;
- restartPolicy is honoured; deletion sends SIGTERM, then SIGKILL after the grace period;
- pod status is truthful: phase, IPs, conditions, container states with exit codes, reasons and
  termination messages (FallbackToLogsOnError included), restart counts.

It also serves the kubelet's ``/containerLogs`` so ``kubectl logs`` works, and ``/healthz``.
The rules themselves live in ``finetune_dev.podspec`` (pure); this package does the I/O, one role
a module:

- ``agent``: the node agent — registers the Node, watches its pods, keeps /etc/hosts current and
  is the package's only client of the API server;
- ``worker``: the pod worker — one thread per pod running its containers; it asks the agent for
  everything through the narrow ``PodHost`` protocol and imports no Kubernetes client;
- ``kubelet_api``: the kubelet's HTTPS API (logs, health);
- ``service_proxy``: the `kubernetes` Service forwarded to the API server, as kube-proxy would;
- ``__main__``: the command line that starts them.
"""
