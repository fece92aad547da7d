{{- define "dicom-ai-node.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dicom-ai-node.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dicom-ai-node.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "dicom-ai-node.secretName" -}}
{{- .Values.database.existingSecret | default (printf "%s-db" (include "dicom-ai-node.fullname" .)) -}}
{{- end -}}

{{/* The database URL from the Secret: the same for the receiver and the workers. */}}
{{- define "dicom-ai-node.databaseEnv" -}}
- name: DICOM_AI_NODE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "dicom-ai-node.secretName" . }}
      key: {{ .Values.database.existingSecretKey }}
{{- end -}}

{{- define "dicom-ai-node.brokerSecretName" -}}
{{- .Values.broker.existingSecret | default (printf "%s-broker" (include "dicom-ai-node.fullname" .)) -}}
{{- end -}}

{{/* The database URL, and with the workers the broker URL, from the Secrets: the same for the
receiver and the workers. */}}
{{- define "dicom-ai-node.env" -}}
{{ include "dicom-ai-node.databaseEnv" . }}
{{- if .Values.worker.enabled }}
- name: DICOM_AI_NODE_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "dicom-ai-node.brokerSecretName" . }}
      key: {{ .Values.broker.existingSecretKey }}
{{- end }}
{{- end -}}

{{/* config.toml: the site's config and the [workers] table, which follows worker.enabled. */}}
{{- define "dicom-ai-node.configToml" -}}
{{ .Values.config | trim }}

[workers]
{{- if .Values.worker.enabled }}
executor = "celery"         # jobs run in the worker pods
# broker_url: from DICOM_AI_NODE_BROKER_URL (the broker Secret)
job_timeout_s = {{ .Values.worker.jobTimeoutSeconds }}
{{- else }}
executor = "local"          # jobs run in the receiver pod
count = 1
{{- end }}
{{- end -}}

{{/* Non-root (the image's user 10001), nothing to escalate, read-only root file system. */}}
{{- define "dicom-ai-node.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "dicom-ai-node.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
