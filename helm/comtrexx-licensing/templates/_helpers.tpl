{{/*
Chart name.
*/}}
{{- define "comtrexx-licensing.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name (at most 63 characters, the DNS label limit).
*/}}
{{- define "comtrexx-licensing.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "comtrexx-licensing.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels (immutable in a Deployment: keep them minimal).
*/}}
{{- define "comtrexx-licensing.selectorLabels" -}}
app.kubernetes.io/name: {{ include "comtrexx-licensing.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Standard labels.
*/}}
{{- define "comtrexx-licensing.labels" -}}
helm.sh/chart: {{ include "comtrexx-licensing.chart" . }}
{{ include "comtrexx-licensing.selectorLabels" . }}
app.kubernetes.io/version: {{ include "comtrexx-licensing.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: licensing
app.kubernetes.io/part-of: comtrexx
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Image tag (defaults to the appVersion).
*/}}
{{- define "comtrexx-licensing.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/*
Image reference: repository@digest when a digest is given, else repository:tag.
*/}}
{{- define "comtrexx-licensing.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "comtrexx-licensing.imageTag" .) }}
{{- end }}
{{- end }}

{{/*
Service account name.
*/}}
{{- define "comtrexx-licensing.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "comtrexx-licensing.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Secret the chart creates for inline secret values.
*/}}
{{- define "comtrexx-licensing.secretName" -}}
{{- include "comtrexx-licensing.fullname" . }}
{{- end }}

{{/*
Whether the chart's own Secret has any content ("true" or "").
*/}}
{{- define "comtrexx-licensing.createSecret" -}}
{{- $v := .Values }}
{{- if or (and $v.redis.password (not $v.redis.existingSecret)) (and $v.vendorPublicKey.value (not $v.vendorPublicKey.existingSecret)) (and $v.license.enabled $v.license.content (not $v.license.existingSecret)) -}}
true
{{- end }}
{{- end }}

{{/*
Name of the TLS Secret (existing or created by the chart).
*/}}
{{- define "comtrexx-licensing.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "comtrexx-licensing.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/*
Where the licensing server's CA bundle comes from: "content", "configMap", "secret" or ""
(none: the service uses its built-in public roots).
*/}}
{{- define "comtrexx-licensing.licensingServerCa" -}}
{{- $ca := .Values.licensingServer.caBundle }}
{{- if $ca.existingSecret -}}
secret
{{- else if $ca.existingConfigMap -}}
configMap
{{- else if $ca.content -}}
content
{{- end }}
{{- end }}

{{/*
Where redis.tlsCaBundle comes from: secret, configMap, content, or "" (none).
*/}}
{{- define "comtrexx-licensing.redisCa" -}}
{{- $ca := .Values.redis.tlsCaBundle }}
{{- if $ca.existingSecret -}}
secret
{{- else if $ca.existingConfigMap -}}
configMap
{{- else if $ca.content -}}
content
{{- end }}
{{- end }}

{{/*
Name of the ConfigMap the chart creates for redis.tlsCaBundle.content.
*/}}
{{- define "comtrexx-licensing.redisCaName" -}}
{{- printf "%s-redis-ca" (include "comtrexx-licensing.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/*
Name of the ConfigMap the chart creates for licensingServer.caBundle.content.
*/}}
{{- define "comtrexx-licensing.licensingServerCaName" -}}
{{- printf "%s-licensing-server-ca" (include "comtrexx-licensing.fullname" . | trunc 43 | trimSuffix "-") }}
{{- end }}

{{/*
Seconds the preStop hook sleeps (null = drainTimeoutSeconds).
*/}}
{{- define "comtrexx-licensing.preStopSleepSeconds" -}}
{{- if kindIs "invalid" .Values.preStopSleepSeconds }}
{{- .Values.drainTimeoutSeconds | int }}
{{- else }}
{{- .Values.preStopSleepSeconds | int }}
{{- end }}
{{- end }}

{{/*
Effective probe mode: grpc or tcp (auto is grpc).
*/}}
{{- define "comtrexx-licensing.probeMode" -}}
{{- if eq .Values.probes.mode "auto" }}
{{- "grpc" }}
{{- else }}
{{- .Values.probes.mode }}
{{- end }}
{{- end }}

{{/*
Probe handler for one probe; argument: dict "root" $ "probe" <probe values>.
*/}}
{{- define "comtrexx-licensing.probeHandler" -}}
{{- $root := .root }}
{{- if eq (include "comtrexx-licensing.probeMode" $root) "grpc" }}
{{- /* The kubelet's gRPC probe speaks no TLS: with TLS, it asks the metrics port,
  which serves the same health status in plaintext. */}}
grpc:
  port: {{ ternary $root.Values.containerPorts.metrics $root.Values.containerPorts.grpc $root.Values.tls.enabled }}
  service: {{ .probe.service | quote }}
{{- else }}
tcpSocket:
  port: grpc
{{- end }}
{{- end }}

{{/*
OTEL_RESOURCE_ATTRIBUTES: pod identity plus otel.resourceAttributes.
*/}}
{{- define "comtrexx-licensing.otelResourceAttributes" -}}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" "service.instance.id=$(POD_NAME)" }}
{{- range $k, $v := .Values.otel.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%v" $k $v) }}
{{- end }}
{{- join "," $attrs }}
{{- end }}

{{/*
Checks of values that the schema cannot express.
*/}}
{{- define "comtrexx-licensing.validate" -}}
{{- $v := .Values }}
{{- if not $v.serialNumber }}
{{- fail "serialNumber is required: set it to the PBX serial number (--set serialNumber=...)" }}
{{- end }}
{{- if and (eq $v.auth.mode "enforce") (not $v.auth.callers) (not $v.auth.existingSecret) }}
{{- fail "auth.mode enforce needs callers: every call but health needs a token or client certificate, and both name their caller only in the callers file; set auth.callers (e.g. --set-file auth.callers=callers.toml, entries made with `comtrexx-licensing auth token --name NAME --role ROLE`) or auth.existingSecret (a Secret holding the callers file), or set auth.mode protected" }}
{{- end }}
{{- if not $v.redis.url }}
{{- fail "redis.url is required (e.g. redis://redis:6379/0): all replicas share their state through Redis" }}
{{- end }}
{{- if and $v.licensingServer.url $v.license.enabled }}
{{- fail "licensingServer.url and license.enabled are mutually exclusive: the service takes its licenses either from the vendor's licensing server or from a signed license file (air-gapped sites), not both; unset one of them" }}
{{- end }}
{{- if and $v.license.enabled (not $v.license.content) (not $v.license.existingSecret) }}
{{- fail "license.enabled needs license.content or license.existingSecret" }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) (or $v.tls.cert $v.tls.key) (not (and $v.tls.cert $v.tls.key)) }}
{{- fail "tls.cert and tls.key go together: set both, or neither (the chart then generates a certificate), or use tls.existingSecret" }}
{{- end }}
{{- if and $v.tls.enabled $v.tls.clientAuth (not $v.tls.existingSecret) (not $v.tls.clientCa) }}
{{- fail "tls.clientAuth needs tls.clientCa (or tls.existingSecret with a ca.crt): client certificates must come from a CA you control" }}
{{- end }}
{{- if and $v.tls.enabled $v.tls.clientCa (not (and $v.tls.cert $v.tls.key)) (not $v.tls.existingSecret) }}
{{- fail "tls.clientCa needs tls.cert and tls.key: with a generated certificate, ca.crt of the TLS Secret holds the generated server CA" }}
{{- end }}
{{- $ca := $v.licensingServer.caBundle }}
{{- if gt (len (compact (list $ca.content $ca.existingConfigMap $ca.existingSecret))) 1 }}
{{- fail "licensingServer.caBundle: set only one of content, existingConfigMap and existingSecret" }}
{{- end }}
{{- if and (include "comtrexx-licensing.licensingServerCa" .) (not $v.licensingServer.url) }}
{{- fail "licensingServer.caBundle is set but licensingServer.url is empty: the CA bundle is only used to verify the licensing server" }}
{{- end }}
{{- $redisCa := $v.redis.tlsCaBundle }}
{{- if gt (len (compact (list $redisCa.content $redisCa.existingConfigMap $redisCa.existingSecret))) 1 }}
{{- fail "redis.tlsCaBundle: set at most one of content, existingConfigMap, existingSecret" }}
{{- end }}
{{- if and (include "comtrexx-licensing.redisCa" .) (not (hasPrefix "rediss://" $v.redis.url)) }}
{{- fail "redis.tlsCaBundle needs a rediss:// redis.url: the service uses it only to verify a TLS connection to Redis" }}
{{- end }}
{{- if and $v.redis.username (not (or $v.redis.password $v.redis.existingSecret)) }}
{{- fail "redis.username needs a password: set redis.password or redis.existingSecret" }}
{{- end }}
{{- if and (include "comtrexx-licensing.licensingServerCa" .) (not (hasPrefix "https://" $v.licensingServer.url)) }}
{{- fail "licensingServer.caBundle needs an https:// licensingServer.url: the service refuses a CA bundle for a plaintext connection" }}
{{- end }}
{{- end }}
