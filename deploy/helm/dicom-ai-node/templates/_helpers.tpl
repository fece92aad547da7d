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
